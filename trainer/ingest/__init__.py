"""Ingest of chat exports (Telegram, Discord, Messenger, WhatsApp) into normalized messages."""
