"""Hugging Face PEFT's adapter format (``adapter_config.json`` + ``adapter_model.safetensors``) for the methods
PEFT implements and mslora runs through it: ``lora``, ``dora`` and ``hira``.

Our PEFT methods are PEFT's own layers (``inject_adapter_in_model``), so both directions go through PEFT's
functions: :func:`export_peft` writes what ``PeftModel.save_pretrained`` writes (keys under
``base_model.model.``, the classifier head as ``modules_to_save``), so ``PeftModel.from_pretrained(timm_model,
DIR)`` loads it; :func:`import_peft` reads such a folder onto a timm model with ``set_peft_model_state_dict``.
PiSSA is refused: it rewrites the backbone's weights, which PEFT's format does not carry unless converted to LoRA.
"""
from __future__ import annotations

import copy
import re
from pathlib import Path

from safetensors.torch import load_file
from torch import nn

from mslora.core.adapt import adapt, undo_failed
from mslora.core.state import adaptation, adapter_state_dict, architecture, write_safetensors

PREFIX = "base_model.model."  # PeftModel -> LoraModel -> the timm model
METHODS = {"lora": "LORA", "dora": "LORA", "hira": "HIRA"}


def export_peft(model: nn.Module, directory: str | Path) -> Path:
    """Write ``model``'s adapter (and trained head) as a PEFT adapter folder; returns the folder.

    Raises:
        ValueError: the model is not adapted with lora, dora or hira (PiSSA named apart), or the folder exists
            and is not empty (nothing is overwritten).
    """
    from peft import get_peft_model_state_dict  # PEFT takes seconds to import: only when used

    rec = adaptation(model)
    if rec is None or rec.method not in METHODS:
        what = "not adapted" if rec is None else f"adapted with '{rec.method}'"
        extra = " (PiSSA rewrites the backbone's weights, which PEFT's format does not carry)" if \
            rec is not None and rec.method == "pissa" else ""
        raise ValueError(f"model is {what}; PEFT's format holds {', '.join(METHODS)}{extra}")
    out = Path(directory)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"'{out}' exists and is not empty; choose a new folder (nothing is overwritten)")
    cfg = copy.deepcopy(model.peft_config["default"])
    head = {k: v for k, v in adapter_state_dict(model).items() if any(k.startswith(h + ".") for h in rec.head)}
    cfg.modules_to_save = list(rec.head) or None
    cfg.base_model_name_or_path = architecture(model)
    tensors = {PREFIX + k: v for k, v in get_peft_model_state_dict(model, adapter_name="default").items()}
    tensors.update({PREFIX + k: v for k, v in head.items()})
    out.mkdir(parents=True, exist_ok=True)
    cfg.save_pretrained(str(out))
    write_safetensors({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, out / "adapter_model.safetensors",
              metadata={"format": "pt"})
    return out


def import_peft(model: nn.Module, directory: str | Path) -> nn.Module:
    """Adapt a fresh timm ``model`` as the PEFT adapter folder says and load its tensors (adapter and
    ``modules_to_save`` head); returns the model, adapted with lora, dora or hira as mslora records it.

    Raises:
        FileNotFoundError: the folder lacks adapter_config.json or adapter_model.safetensors.
        ValueError: a PEFT method mslora does not run (named), PiSSA, or tensors that do not fit the model.
    """
    from peft import PeftConfig  # PEFT takes seconds to import: only when used

    folder = Path(directory)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"'{folder}' has no {name}: not a PEFT adapter folder")
    try:
        cfg = PeftConfig.from_pretrained(str(folder))
    except (TypeError, ValueError, KeyError) as e:  # PEFT's own check of the json (e.g. no peft_type)
        raise ValueError(f"'{folder / 'adapter_config.json'}' is not a PEFT adapter config: {e}") from None
    kind = str(getattr(cfg.peft_type, "value", cfg.peft_type))
    if kind not in set(METHODS.values()):
        raise ValueError(f"PEFT method {kind} is not one mslora runs; it reads {', '.join(sorted(set(METHODS.values())))}")
    if kind == "LORA" and str(cfg.init_lora_weights).lower().startswith("pissa"):
        raise ValueError("a PiSSA adapter needs the backbone weights it rewrote; convert it to LoRA in PEFT first")
    method = "hira" if kind == "HIRA" else "dora" if cfg.use_dora else "lora"
    targets = cfg.target_modules
    if isinstance(targets, (list, set, tuple)):  # PEFT: a module matches a name exactly or as a dotted suffix
        targets = r"(.*\.)?(" + "|".join(re.escape(t) for t in sorted(targets)) + ")"
    options = {"rank": cfg.r, "target_modules": targets}
    if method != "hira":
        options.update(alpha=cfg.lora_alpha, dropout=cfg.lora_dropout)
    adapt(model, method, **options)
    try:
        return _load_peft_tensors(model, folder, cfg.r)
    except Exception:
        undo_failed(model)  # a failed import changes nothing: the model as it was, a retry works
        raise


def _load_peft_tensors(model: nn.Module, folder: Path, r: int) -> nn.Module:
    """Load a PEFT folder's tensors into ``model`` just adapted for them (:func:`import_peft`; ``r``: its config's
    rank, for the message).

    Raises:
        ValueError: a file that is not safetensors, LoRA tensors missing or unexpected, or a head of another size.
    """
    try:
        loaded = load_file(str(folder / "adapter_model.safetensors"))
    except Exception as e:
        raise ValueError(f"'{folder / 'adapter_model.safetensors'}' is not a readable safetensors file: {e}") from None
    from peft import set_peft_model_state_dict

    tensors = {k.removeprefix(PREFIX): v for k, v in loaded.items()}
    head_names = adaptation(model).head
    head = {k: v for k, v in tensors.items() if any(k.startswith(h + ".") for h in head_names)}
    try:
        result = set_peft_model_state_dict(model, {k: v for k, v in tensors.items() if k not in head},
                                           adapter_name="default")
    except RuntimeError as e:  # torch's size mismatch: the config's r (or targets) are not the tensors'
        first = next((ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln), str(e).splitlines()[0])
        raise ValueError(f"PEFT tensors in '{folder}' do not fit the adapter its config describes (r={r}"
                         f"): {first}") from None
    missing = [k for k in result.missing_keys if "lora_" in k or "hira_" in k]
    if result.unexpected_keys or missing:
        raise ValueError(f"PEFT adapter in '{folder}' does not fit this model: missing {missing[:3]}, unexpected "
                         f"{list(result.unexpected_keys)[:3]}")
    if head:
        own = dict(model.state_dict())
        bad = [k for k, v in head.items() if k not in own or own[k].shape != v.shape]
        if bad:
            raise ValueError(f"head tensor(s) {bad[:3]} of '{folder}' do not fit this model's head (another number "
                             "of classes?)")
        model.load_state_dict(head, strict=False)
    return model
