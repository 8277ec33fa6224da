"""flantune merge, export and push: a LoRA/IA3 adapter folded into its base; a model converted to
CTranslate2; a model folder sent to the Hub.

A merged model loads with `AutoModelForSeq2SeqLM.from_pretrained` alone, and its logits equal those
of the base with the adapter (up to float rounding). An export to CTranslate2 merges first, then
converts with CTranslate2's own converter; its float32 greedy outputs are flantune's. Merge and push
leave a model card (README.md, flantune.final.write_card) in the folder: merge writes the merged
model's, push writes one into a folder that has none, so the Hub always receives a card.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from transformers import AutoConfig

from flantune import checkpoint as ckpt
from flantune.errors import ExportError  # re-exported: flantune.export.ExportError
from flantune.final import ensure_card, load_final, read_final, run_record, save_tokenizer, write_card
from flantune.models import load_tokenizer


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


CT2_QUANTIZATIONS = (
    "int8", "int8_float32", "int8_float16", "int8_bfloat16", "int16", "float16", "bfloat16", "float32",
)  # fmt: skip
"""The weight types CTranslate2's converter writes (its `quantization` argument)."""
CT2_MODEL_TYPES = ("t5", "mt5", "umt5", "bart")
"""The architectures the export converts (CTranslate2's T5, mT5, UMT5 and BART loaders)."""


def to_ctranslate2(
    folder: str,
    out: str | None = None,
    quantization: str | None = None,
    base: str | None = None,
    other_base: bool = False,
) -> Path:
    """Convert a model folder or a LoRA/IA3 adapter (merged into its base first) to a CTranslate2
    model folder `out` (default: FOLDER-ctranslate2 beside it), with the tokenizer beside it.

    quantization: one of CT2_QUANTIZATIONS; None keeps the weights' own type. CTranslate2 can
    still pick another compute type when it loads the model.
    """
    if quantization is not None and quantization not in CT2_QUANTIZATIONS:
        raise ExportError(
            f"--quantization {quantization}: not a CTranslate2 weight type; give one of "
            + ", ".join(CT2_QUANTIZATIONS)
        )
    info = read_final(folder)
    if info is None:
        raise ExportError(
            f"{folder}: not a model or adapter folder (no config.json or adapter_config.json); "
            "give a run's final/ or a model folder"
        )
    if not info.is_adapter and (base is not None or other_base):
        raise ExportError(f"--base and --other-base are for an adapter; {folder} is a full model folder")
    out = out or str(info.folder.resolve().with_name(f"{info.folder.resolve().name}-ctranslate2"))
    if Path(out).exists() and any(Path(out).iterdir()):
        raise ExportError(f"{out} exists and is not empty; choose another folder with --out")
    try:
        import ctranslate2
    except ImportError:
        raise ExportError(
            "the CTranslate2 export needs the ctranslate2 package: pip install 'flantune[ctranslate2]'"
        ) from None
    out_path = Path(out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    # The merged model goes beside the output (it can be as large as the model), never into /tmp.
    with tempfile.TemporaryDirectory(prefix=f".merged-{out_path.name}-", dir=out_path.parent) as scratch:
        model_dir = info.folder
        if info.is_adapter:
            model_dir = merge(folder, str(Path(scratch) / "model"), base, other_base)
        try:
            config = AutoConfig.from_pretrained(model_dir)
        except (OSError, ValueError) as e:
            raise ExportError(f"{folder}: cannot read its config.json: {str(e).splitlines()[0]}") from None
        if config.model_type not in CT2_MODEL_TYPES:
            raise ExportError(
                f"{folder}: a {config.model_type} model; the CTranslate2 export converts "
                + ", ".join(CT2_MODEL_TYPES)
            )
        tokenizer = load_tokenizer(str(model_dir), what=folder)
        converter = _ct2_converter(ctranslate2)(
            str(model_dir), config.vocab_size, load_as_float16=quantization in ("float16", "int8_float16")
        )
        with ckpt.atomic_dir(out_path) as tmp:
            try:
                converter.convert(str(tmp), quantization=quantization, force=True)  # tmp is ours to replace
            except OSError as e:  # no weights in the folder, say
                raise ExportError(f"{folder}: cannot load the model: {str(e).splitlines()[0]}") from None
            # CTranslate2 reads model.bin, config.json and the vocabulary; the tokenizer beside them
            # turns text into the tokens it takes (tokenizer.convert_ids_to_tokens) and back.
            tokenizer.save_pretrained(tmp)
    return out_path


def _ct2_converter(ctranslate2):
    """CTranslate2's converter for transformers models (`TransformersConverter`), reading a model
    as transformers 5 and flantune write it; `embedding_rows` is the config's vocab_size.

    - T5: transformers 5 always sets `tie_word_embeddings` (T5 ties its input embeddings) and says in
      `scale_decoder_outputs` whether the decoder output is scaled by d_model**-0.5 before the head
      (original T5: yes; T5 v1.1 and FLAN-T5: no). The converter reads `tie_word_embeddings` for that
      scale, which would divide FLAN-T5's logits by sqrt(d_model): greedy output unchanged, scores,
      beams and sampling wrong. mT5 never scales. UMT5 reads the field in recent releases; early
      transformers 5 releases (5.17) have none and always scale.
    - BART: transformers 5's config has no `normalize_before` (BART is post-norm; the model code
      never read it), which the converter reads.
    - The vocabulary, which the converter takes from the tokenizer, must name every embedding row:
      flantune's added tokens grow the embeddings to a multiple of 8, beyond the tokenizer (T5's
      checkpoints hold 28 such rows, which the converter names by repeating <extra_id_*>).
    """

    class Converter(ctranslate2.converters.TransformersConverter):
        def __init__(self, model_dir: str, embedding_rows: int, **kwargs):
            super().__init__(model_dir, **kwargs)
            self.embedding_rows = embedding_rows

        def load_model(self, model_class, model_name_or_path, **kwargs):
            model = super().load_model(model_class, model_name_or_path, **kwargs)
            config = model.config
            if config.model_type == "mt5":
                config.tie_word_embeddings = False
            elif config.model_type in ("t5", "umt5"):
                config.tie_word_embeddings = getattr(config, "scale_decoder_outputs", True)
            elif config.model_type == "bart":
                config.normalize_before = False
            return model

        def load_tokenizer(self, tokenizer_class, model_name_or_path, **kwargs):
            # This copy names the vocabulary only; the tokenizer saved with the model is unchanged.
            tokenizer = super().load_tokenizer(tokenizer_class, model_name_or_path, **kwargs)
            unused = [f"<unused_{i}>" for i in range(self.embedding_rows - len(tokenizer))]
            if unused:
                tokenizer.add_tokens(unused, special_tokens=True)
            return tokenizer

    return Converter


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
