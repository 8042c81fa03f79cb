"""Settings, database, migrations and the CLI's error handling."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError

from common.errors import ConfigError, DatabaseError
from tests.helpers import run_cli


# --- settings ---
def test_env_overrides_toml_and_sources_are_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from doppel.settings import load_settings

    (tmp_path / "doppel.toml").write_text('context_window_hours = 2.5\npersona_name = "Alex"\n')
    monkeypatch.setenv("DOPPEL_PERSONA_NAME", "Sasha")
    settings, sources = load_settings()
    assert settings.context_window_hours == 2.5
    assert settings.persona_name == "Sasha"
    assert sources["context_window_hours"].endswith("doppel.toml")
    assert sources["persona_name"] == "env DOPPEL_PERSONA_NAME"
    assert sources["turn_gap_minutes"] == "default"


@pytest.mark.parametrize(
    ("toml", "needle"),
    [
        ("contxt_window_hours = 2\n", "unknown setting `contxt_window_hours`"),
        ("context_window_hours = \n", "is not valid TOML"),
        ('context_window_hours = "soon"\n', "Setting `context_window_hours`"),
        ("context_window_hours = -1\n", "Setting `context_window_hours`"),
    ],
)
def test_bad_config_file_gives_one_clear_error(tmp_path: Path, toml: str, needle: str) -> None:
    from doppel.settings import load_settings

    (tmp_path / "doppel.toml").write_text(toml)
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert needle in str(info.value)


def test_config_command_masks_secrets(tmp_path: Path) -> None:
    result = run_cli("config", env={"DOPPEL_TELEGRAM_TOKEN": "123:very-secret-token", "COLUMNS": "200"}, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "very-secret-token" not in result.stdout
    assert "telegram_token" in result.stdout and "(set)" in result.stdout
    assert "env DOPPEL_TELEGRAM_TOKEN" in result.stdout


def test_bad_env_value_exits_with_message_not_traceback(tmp_path: Path) -> None:
    result = run_cli("config", env={"DOPPEL_CONTEXT_MAX_MESSAGES": "many"}, cwd=tmp_path)
    assert result.returncode == 2
    assert "context_max_messages" in result.stderr
    assert "Traceback" not in result.stderr


def test_version_and_help(tmp_path: Path) -> None:
    from doppel import __version__

    assert __version__ in run_cli("--version", cwd=tmp_path).stdout
    help_text = run_cli("--help", cwd=tmp_path).stdout
    for command in ("config", "db", "ingest", "dataset", "demo"):
        assert command in help_text


@pytest.mark.parametrize("argv, code", [(["--version"], 0), (["ingest", "missing.json", "--me", "X"], 3)])
def test_a_process_that_loaded_torch_ends_fast_and_still_cleanly(tmp_path: Path, argv: list[str], code: int) -> None:
    """The `doppel` program skips the interpreter's teardown once torch is loaded (cli.run, cli.finish);
    exit handlers still run, buffered output (to a pipe) still arrives, temporary folders still go,
    the code is kept."""
    script = (
        "import atexit, sys, tempfile, torch\n"
        "d = tempfile.TemporaryDirectory(dir=sys.argv[1])\n"
        "open(d.name + '/x', 'w').close()\n"
        "atexit.register(lambda: print('exit handler ran'))\n"
        "class Torn:\n    def __del__(self):\n        print('torn down')\n"
        "kept = Torn()\n"
        "print('x' * 100000)\n"
        "from doppel.cli import run\n"
        "sys.argv = ['doppel'] + sys.argv[2:]\n"
        "run()\n"
        "print('not reached')\n"
    )
    env = {**__import__("os").environ, "DOPPEL_DATA_DIR": str(tmp_path / "data")}
    probe = subprocess.run([sys.executable, "-c", script, str(tmp_path), *argv], capture_output=True, text=True,
                           cwd=tmp_path, env=env)
    out = probe.stdout
    assert "x" * 100000 in out and out.rstrip().endswith("exit handler ran") and "not reached" not in out, out[-500:]
    assert "torn down" not in out  # the teardown was skipped (it ran without cli.finish)
    assert probe.returncode == code
    if code:  # an error (here: no database yet) is still one message and its code
        assert "Error:" in probe.stderr and "doppel db upgrade" in probe.stderr and "Traceback" not in probe.stderr
    assert [p for p in tmp_path.iterdir() if p.name.startswith("tmp")] == []

    # code that calls main() itself keeps its process: SystemExit, as before
    inline = subprocess.run([sys.executable, "-c", "import sys, torch\nfrom doppel.cli import main\nsys.argv = ['doppel', '--version']\n"
                             "try:\n    main()\nexcept SystemExit as exc:\n    print('went on', exc.code)\n"],
                            capture_output=True, text=True, cwd=tmp_path, env=env)
    assert inline.returncode == 0 and "went on" in inline.stdout, inline.stdout + inline.stderr


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_output_that_cannot_be_written_is_not_a_success(tmp_path: Path) -> None:
    """With the teardown skipped, a failed flush of stdout still exits 120, as Python does."""
    import os

    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # the output waits in the buffer
    env["DOPPEL_DATA_DIR"] = str(tmp_path)
    with open("/dev/full", "w") as full:
        probe = subprocess.run([sys.executable, "-c", "import torch\nprint('still in the buffer')\n"
                                "from doppel.cli import finish\nfinish(0)\nprint('not reached')\n"], stdout=full, stderr=subprocess.PIPE,
                               text=True, cwd=tmp_path, env=env)
    assert probe.returncode == 120, probe.stderr


def test_head_from_files_reads_what_alembic_reads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The schema check's fast head: plain revision lines give the head; an editor's lock file and
    __init__ are not migrations; a merge or a tuple leaves the answer to Alembic (None)."""
    import migrations
    from doppel.migrate import head_from_files

    versions = tmp_path / "versions"
    versions.mkdir()
    (tmp_path / "__init__.py").write_text("")
    monkeypatch.setattr(migrations, "__file__", str(tmp_path / "__init__.py"))
    (versions / "__init__.py").write_text("")
    (versions / "0001_a.py").write_text('"""First.\n\nrevision: docs\n"""\nrevision = \'0001\'\ndown_revision = None\n')
    (versions / "0002_b.py").write_text("revision: str = '0002'\ndown_revision: Union[str, None] = '0001'\n")
    (versions / ".#0002_b.py").symlink_to(tmp_path / "nowhere")  # Emacs' lock: a dangling link
    assert head_from_files() == "0002"
    (versions / "0003_c.py").write_text("revision = '0003'\ndown_revision = ('0001', '0002')\n")
    assert head_from_files() is None


# --- database ---
def _check_schema(url: str) -> None:
    from doppel.migrate import current_revision, drift, ensure_current, head_from_files, head_revision, upgrade
    from feedback.db import make_engine

    engine = make_engine(url)
    with pytest.raises(DatabaseError, match="doppel db upgrade"):
        ensure_current(engine)
    before, after = upgrade(engine)
    assert before is None and after == head_revision(engine)
    assert head_from_files() == after  # the check's fast path reads the head Alembic reads
    assert current_revision(engine) == after
    assert drift(engine) == []  # models and migrations agree (what `alembic check` checks)
    ensure_current(engine)
    engine.dispose()


def test_upgrade_and_no_drift_on_sqlite(tmp_path: Path) -> None:
    _check_schema(f"sqlite:///{tmp_path / 'x.db'}")


@pytest.mark.postgres
def test_upgrade_and_no_drift_on_postgres(pg_url: str) -> None:
    _check_schema(pg_url)


def _alembic_check(url: str) -> None:
    """The real `alembic upgrade head` and `alembic check` from the repository's alembic.ini."""
    import os

    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "DOPPEL_DATABASE_URL": url}
    alembic = [sys.executable, "-m", "alembic", "-c", str(repo / "alembic.ini")]
    up = subprocess.run([*alembic, "upgrade", "head"], capture_output=True, text=True, env=env, cwd=repo)
    assert up.returncode == 0, up.stderr
    check = subprocess.run([*alembic, "check"], capture_output=True, text=True, env=env, cwd=repo)
    assert check.returncode == 0, check.stderr + check.stdout
    assert "No new upgrade operations detected" in check.stdout + check.stderr


def test_alembic_check_reports_no_drift_on_sqlite(tmp_path: Path) -> None:
    _alembic_check(f"sqlite:///{tmp_path / 'a.db'}")


@pytest.mark.postgres
def test_alembic_check_reports_no_drift_on_postgres(pg_url: str) -> None:
    _alembic_check(pg_url)


def test_database_ahead_of_code_is_refused(engine) -> None:  # type: ignore[no-untyped-def]
    from doppel.migrate import ensure_current

    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = 'f00dfeed'"))
    with pytest.raises(DatabaseError, match="newer than this version"):
        ensure_current(engine)


def test_database_behind_the_code_is_refused(engine) -> None:  # type: ignore[no-untyped-def]
    from doppel.migrate import ensure_current

    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '0004'"))
    with pytest.raises(DatabaseError, match="behind the code"):
        ensure_current(engine)


def test_sqlite_runs_in_wal_mode_with_foreign_keys(engine) -> None:  # type: ignore[no-untyped-def]
    with engine.connect() as conn:
        assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert conn.execute(text("PRAGMA foreign_keys")).scalar() == 1


def test_one_current_rating_per_person_per_reply(engine) -> None:  # type: ignore[no-untyped-def]
    from feedback.db import make_session_factory
    from feedback.models import Chat, Rating, Reply

    factory = make_session_factory(engine)
    with factory() as s:
        chat = Chat(platform="cli", external_id="1")
        s.add(chat)
        s.flush()
        reply = Reply(chat_id=chat.id, text="hi", prompt="p", latency_ms=1.0)
        s.add(reply)
        s.flush()
        s.add(Rating(reply_id=reply.id, rater_id="u1", value=1))
        s.commit()
        s.add(Rating(reply_id=reply.id, rater_id="u1", value=-1))
        with pytest.raises(IntegrityError):
            s.commit()


def test_unreachable_database_is_a_clear_error(tmp_path: Path) -> None:
    from feedback.db import make_engine

    url = "postgresql+psycopg://postgres:hunter2@127.0.0.1:1/test"
    with pytest.raises(DatabaseError) as info:
        make_engine(url)
    assert "hunter2" not in str(info.value)
    result = run_cli("db", "upgrade", env={"DOPPEL_DATABASE_URL": url}, cwd=tmp_path)
    assert result.returncode == 3
    assert "Cannot connect to the database" in result.stderr
    assert "hunter2" not in result.stderr and "Traceback" not in result.stderr


def test_commands_refuse_a_database_without_schema(tmp_path: Path) -> None:
    sample = Path(__file__).resolve().parents[1] / "doppel" / "samples" / "telegram_export.json"
    result = run_cli("ingest", str(sample), cwd=tmp_path)
    assert result.returncode == 3
    assert "doppel db upgrade" in result.stderr


def test_readme_documents_every_setting() -> None:
    from doppel.settings import Settings

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    missing = [name for name in Settings.model_fields if f"`DOPPEL_{name.upper()}`" not in readme]
    assert missing == [], f"run `python scripts/settings_table.py` and update README.md: {missing}"


def test_empty_token_counts_as_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    from doppel.settings import load_settings

    monkeypatch.setenv("DOPPEL_TELEGRAM_TOKEN", "")
    assert load_settings()[0].telegram_token is None
