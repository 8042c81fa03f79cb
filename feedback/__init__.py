"""The store: SQLAlchemy models and sessions, recording replies/ratings/corrections, replay."""
