"""flantune merge: fold a LoRA or IA3 adapter into its base and save a plain transformers model.

The result loads with `AutoModelForSeq2SeqLM.from_pretrained` alone, and its logits equal those of
the base with the adapter (up to float rounding).
"""

from __future__ import annotations

import json
from pathlib import Path

from flantune import checkpoint as ckpt


class ExportError(ValueError):
    """The adapter cannot be merged; the message says why."""


def merge(adapter: str, out: str, base: str | None = None) -> Path:
    """Merge `adapter` into its base (or `base`) and write the full model and tokenizer to `out`."""
    from peft import PeftConfig, PeftModel

    from flantune.models import fit_embeddings, load_model, load_tokenizer, recorded_base

    folder = Path(adapter)
    config_file = folder / "adapter_config.json"
    if not config_file.is_file():
        raise ExportError(
            f"{adapter}: no adapter_config.json; merge takes an adapter folder (e.g. a run's final/)"
        )
    if json.loads(config_file.read_text()).get("kind") == "bottleneck":
        raise ExportError(
            f"{adapter}: bottleneck adapters are non-linear and cannot be folded into the weights"
        )
    peft_config = PeftConfig.from_pretrained(adapter)
    if str(getattr(peft_config.peft_type, "value", peft_config.peft_type)) not in ("LORA", "IA3"):
        raise ExportError(
            f"{adapter}: a {peft_config.peft_type} adapter cannot be merged (only LoRA and IA3 can)"
        )
    if Path(out).exists() and any(Path(out).iterdir()):
        raise ExportError(f"--out {out} exists and is not empty; choose another folder")

    recorded = recorded_base(adapter)
    path = base or recorded["path"]
    init = "pretrained" if base else recorded["init"]
    model = load_model(path, init=init, seed=recorded["seed"], revision=recorded["revision"])
    has_tokenizer = (folder / "tokenizer_config.json").is_file()
    tokenizer = load_tokenizer(adapter if has_tokenizer else path)
    fit_embeddings(model, tokenizer)
    try:
        model = PeftModel.from_pretrained(model, adapter)
    except (RuntimeError, ValueError, KeyError) as e:
        raise ExportError(f"{adapter} does not fit the base {path}: {str(e).splitlines()[0]}") from None
    merged = model.merge_and_unload()
    with ckpt.atomic_dir(Path(out)) as tmp:
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return Path(out)


def push(folder: str, repo_id: str, *, private: bool = False, token: str | None = None) -> str:
    """Upload a model or adapter folder (a run's final/, a merged model) to the Hugging Face Hub.

    Nothing is skipped quietly: without a token, offline, or when the hub refuses, the error says
    why nothing was pushed.
    """
    import os

    from huggingface_hub import HfApi, get_token
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    path = Path(folder)
    if not path.is_dir() or not any(
        (path / name).is_file() for name in ("config.json", "adapter_config.json")
    ):
        raise ExportError(f"{folder}: not a model or adapter folder (no config.json or adapter_config.json)")
    token = token or get_token()
    if not token:
        raise ExportError(
            "not pushed: no Hugging Face token (pass --token, set HF_TOKEN, or run `hf auth login`)"
        )
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        raise ExportError("not pushed: HF_HUB_OFFLINE is set, so the hub cannot be reached; unset it to push")
    api = HfApi(token=token)
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True)
        api.upload_folder(
            repo_id=repo_id, folder_path=str(path), commit_message=f"Upload {path.name} with flantune"
        )
    except OfflineModeIsEnabled as e:
        raise ExportError(f"not pushed: offline mode ({e})") from None
    except HfHubHTTPError as e:
        raise ExportError(f"not pushed: the hub refused {repo_id}: {str(e).splitlines()[0]}") from None
    except Exception as e:  # connection errors: the HTTP client's own classes differ between versions
        raise ExportError(f"not pushed: cannot reach the hub ({type(e).__name__}: {e})") from None
    return str(url)
