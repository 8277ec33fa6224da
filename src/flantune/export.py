"""flantune merge and push: a LoRA/IA3 adapter folded into its base; a model folder sent to the Hub.

The merged model loads with `AutoModelForSeq2SeqLM.from_pretrained` alone, and its logits equal
those of the base with the adapter (up to float rounding). Both commands leave a model card
(README.md, flantune.final.write_card) in the folder: merge writes the merged model's, push writes
one into a folder that has none, so the Hub always receives a card.
"""

from __future__ import annotations

from pathlib import Path

from flantune import checkpoint as ckpt
from flantune.final import ensure_card, load_final, read_final, run_record, save_tokenizer, write_card


class ExportError(ValueError):
    """The adapter cannot be merged; the message says why."""


def merge(adapter: str, out: str, base: str | None = None, other_base: bool = False) -> Path:
    """Merge `adapter` into its base (or `base`: another than the recorded one needs `other_base`)
    and write the full model and tokenizer to `out`."""
    info = read_final(adapter)
    if info is None or not info.is_adapter:
        raise ExportError(
            f"{adapter}: no adapter_config.json; merge takes an adapter folder (e.g. a run's final/)"
        )
    if info.kind == "bottleneck":
        raise ExportError(
            f"{adapter}: bottleneck adapters are non-linear and cannot be folded into the weights"
        )
    if info.method not in ("lora", "qlora", "ia3"):
        raise ExportError(f"{adapter}: a {info.method} adapter cannot be merged (only LoRA and IA3 can)")
    if Path(out).exists() and any(Path(out).iterdir()):
        raise ExportError(f"--out {out} exists and is not empty; choose another folder")
    loaded = load_final({"default": adapter}, base=base, device="cpu", what="ADAPTER", base_what="--base",
                        other_base=other_base)  # fmt: skip
    merged = loaded.model.merge_and_unload()
    run = run_record(info.folder)  # the adapter's run, when it is a run's final/
    with ckpt.atomic_dir(Path(out)) as tmp:
        merged.save_pretrained(tmp)
        save_tokenizer(loaded.tokenizer, tmp)
        write_card(tmp, at=out, base=loaded.base, merged_from=info, **run)
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
    if read_final(path) is None:
        raise ExportError(f"{folder}: not a model or adapter folder (no config.json or adapter_config.json)")
    token = token or get_token()
    if not token:
        raise ExportError(
            "not pushed: no Hugging Face token (pass --token, set HF_TOKEN, or run `hf auth login`)"
        )
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        raise ExportError("not pushed: HF_HUB_OFFLINE is set, so the hub cannot be reached; unset it to push")
    # The card goes up with the folder: one is written first where there is none, and the code in a
    # card flantune wrote then loads from `repo_id`.
    try:
        ensure_card(path, repo_id)
    except OSError as e:
        raise ExportError(f"not pushed: cannot write the model card {path / 'README.md'}: {e}") from None
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
