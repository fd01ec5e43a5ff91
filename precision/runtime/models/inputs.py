"""What a captured model is fed (torch needed): prompts through its tokenizer, ``--image``
files through its image processor, ``--audio`` wav files through its feature extractor, and
``--feed`` files of named tensors passed to ``forward`` as they are.

Prompts are tokenized as the model was trained: the padding side its tokenizer declares
(left only for a causal LM, whose generation appends on the right) and at most its
``model_max_length`` tokens; a longer prompt is truncated, with one line saying so.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...errors import InputError

#: a tokenizer's ``model_max_length`` at or above this means "no limit declared"
NO_LIMIT = 1_000_000
#: the files a processor (``--image``, ``--audio``) is saved as in a model folder
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")


@dataclass(frozen=True)
class Sources:
    """The inputs a capture was asked for (what the dump's ``inputs`` meta records)."""

    prompts: Sequence[str] = ()
    images: Sequence[str] = ()
    audio: Sequence[str] = ()
    feed: str | None = None
    defaults: Sequence[str] = field(default_factory=tuple)

    def as_meta(self) -> dict[str, Any]:
        """What fed the model; the built-in prompts only when nothing else did."""
        fed = self.images or self.audio or self.feed
        return {"prompts": list(self.prompts) or ([] if fed else list(self.defaults)),
                "images": [str(p) for p in self.images],
                "audio": [str(p) for p in self.audio], "feed": self.feed}


def check_prompts(prompts: Sequence[str]) -> None:
    """Refuse an empty (or blank) prompt: there is nothing to run the model on."""
    for i, p in enumerate(prompts, 1):
        if not p.strip():
            raise InputError(f"prompt {i} is empty: give text to run the model on "
                             "(or --image, --audio, --feed for other inputs)")


def main_input(model: Any) -> str:
    """The input a model cannot run without (``input_ids``, ``pixel_values``, ...)."""
    return str(getattr(model, "main_input_name", "input_ids") or "input_ids")


def build(model: Any, tokenizer: Any, path: Path, src: Sources, *, generates: bool,
          log: Callable[[str], None] = lambda _msg: None) -> dict[str, torch.Tensor]:
    """The model's inputs (on the CPU, floats in fp32) from ``src``."""
    out: dict[str, torch.Tensor] = {}
    prompts = list(src.prompts)
    check_prompts(prompts)
    main = main_input(model)
    for flag, files, kind, examples in (("--image", src.images, "image processor", "ViT, CLIP"),
                                        ("--audio", src.audio, "feature extractor",
                                         "Whisper, wav2vec2")):
        if files and main == "input_ids" and not _has_processor(path):
            raise InputError(f"{type(model).__name__} takes text (input_ids) and {path} holds "
                             f"no {kind} ({PROCESSOR_FILES[0]}): {flag} is for models that "
                             f"read it ({examples}); give --prompt, or --feed FILE with "
                             "named tensors")
    if src.images and not prompts and not src.feed and main == "input_ids":
        raise InputError(f"{type(model).__name__} reads text with its images: give --prompt "
                         "too, holding its processor's image token (e.g. <image>)")
    if src.images:
        out |= _images(path, src.images, prompts, generates)
        prompts = [] if "input_ids" in out else prompts
    if src.audio:
        out |= _audio(path, src.audio)
    if src.feed:
        out |= read_feed(src.feed)
    if prompts:
        out |= tokenize(model, tokenizer, prompts, generates=generates, log=log)
    if not out:
        if main != "input_ids":
            what = {"pixel_values": "--image FILE", "input_features": "--audio FILE.wav",
                    "input_values": "--audio FILE.wav"}.get(main, "--feed FILE")
            raise InputError(f"{type(model).__name__} takes {main}: give {what} "
                             "(or --feed FILE with named tensors)")
        out = tokenize(model, tokenizer, list(src.defaults), generates=generates, log=log)
    return out


def _has_processor(path: Path) -> bool:
    """Whether a model folder holds a saved processor, image processor or feature extractor
    (what ``--image`` and ``--audio`` go through)."""
    return any((path / name).is_file() for name in PROCESSOR_FILES)


def tokenize(model: Any, tokenizer: Any, prompts: Sequence[str], *, generates: bool,
             log: Callable[[str], None] = lambda _msg: None) -> dict[str, torch.Tensor]:
    """Batch-encode prompts with the tokenizer's padding; truncate to its maximum length."""
    if tokenizer is None:
        raise InputError(f"{type(model).__name__} has no tokenizer saved with it: feed it "
                         "with --image, --audio or --feed FILE instead of prompts")
    check_prompts(prompts)
    limit = getattr(tokenizer, "model_max_length", None)
    limit = int(limit) if isinstance(limit, (int, float)) and limit < NO_LIMIT else None
    ids = [tokenizer(p)["input_ids"] for p in prompts]
    lengths = [len(x) for x in ids]
    for i, n in enumerate(lengths, 1):
        if n == 0:
            raise InputError(f"prompt {i} makes no token with {type(tokenizer).__name__} "
                             "(the tokenizer saved with the model?): pass token ids with "
                             "--feed FILE instead")
    _check_known(tokenizer, ids, log)
    trunc = limit is not None and max(lengths) > limit
    if trunc:
        assert limit is not None
        i = max(range(len(lengths)), key=lambda j: lengths[j])
        size = approx_dump_bytes(model, len(prompts), limit)
        log(f"prompt {i + 1} is {lengths[i]} tokens, over the {limit} its tokenizer takes: "
            f"truncated to {limit} (a full dump of about {size / 1e6:.3g} MB)")
    enc = tokenizer(list(prompts), return_tensors="pt", padding=True, truncation=trunc,
                    max_length=limit if trunc else None)
    keep = ("input_ids", "attention_mask") if generates else tuple(enc.keys())
    return {k: v for k, v in enc.items() if k in keep and isinstance(v, torch.Tensor)}


def _check_known(tokenizer: Any, ids: Sequence[Sequence[int]],
                 log: Callable[[str], None]) -> None:
    """Refuse prompts that all come out as unknown tokens: half or more of each prompt's
    word pieces (special tokens and bare word boundaries left out) the tokenizer's ``unk``
    (a folder saved without its tokenizer files, where transformers builds an empty one:
    T5's turns every word into ``<unk>``, and the model then runs on nothing). One prompt in
    that state (text outside the vocabulary) is said."""
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is None:
        return
    special = set(getattr(tokenizer, "all_special_ids", ())) - {unk}

    def words(x: Sequence[int]) -> list[int]:  # no special token, no bare word boundary
        pieces = tokenizer.convert_ids_to_tokens(list(x))  # one call a prompt
        return [t for t, piece in zip(x, pieces, strict=True)
                if t not in special and str(piece).strip("\u2581\u0120 ")]

    unknown = [i for i, x in enumerate(ids, 1)
               if (w := words(x)) and 2 * sum(t == unk for t in w) >= len(w)]
    if unknown and len(unknown) == len(ids):
        raise InputError(f"every prompt comes out of {type(tokenizer).__name__} as mostly "
                         f"unknown tokens ({tokenizer.unk_token}): the model folder has no "
                         "tokenizer files or not this model's (save them with "
                         "tokenizer.save_pretrained(DIR)), or the prompts are no text it "
                         "knows (SMILES, amino acids: pass token ids with --feed FILE)")
    for i in unknown:
        log(f"prompt {i} is half or more unknown tokens ({tokenizer.unk_token}) with "
            f"{type(tokenizer).__name__}: text outside its vocabulary?")


def approx_dump_bytes(model: Any, rows: int, tokens: int) -> int:
    """A full dump's rough size for ``rows`` x ``tokens``: every leaf module's output width
    (``out_features``, ``embedding_dim``, a norm's size, else the hidden size) per token."""
    hidden = int(getattr(getattr(model, "config", None), "hidden_size", 0) or 0)
    width = 0
    for mod in model.modules():
        if next(mod.children(), None) is not None:
            continue
        w = (getattr(mod, "out_features", None) or getattr(mod, "embedding_dim", None)
             or getattr(mod, "normalized_shape", None) or hidden)
        width += int(np.prod(w)) if isinstance(w, (tuple, list)) else int(w)
    item = next((p.element_size() for p in model.parameters()), 4)
    return rows * tokens * width * item


def _open_files(files: Sequence[str], what: str) -> list[Path]:
    paths = [Path(f) for f in files]
    for p in paths:
        if not p.is_file():
            raise InputError(f"{what} {p} does not exist")
    return paths


def _images(path: Path, files: Sequence[str], prompts: list[str],
            generates: bool) -> dict[str, torch.Tensor]:
    """``--image`` files through the model's processor (with the prompts, for a model that
    reads both) or its image processor."""
    import transformers
    from PIL import Image, UnidentifiedImageError

    images = []
    for p in _open_files(files, "--image"):
        try:
            with Image.open(p) as im:
                images.append(im.convert("RGB"))
        except (UnidentifiedImageError, OSError) as exc:
            raise InputError(f"--image {p} is not an image pillow can read: {exc}") from None
    try:
        if prompts:
            proc = transformers.AutoProcessor.from_pretrained(path, local_files_only=True)
            enc = proc(text=prompts, images=images, return_tensors="pt", padding=True)
        else:
            proc = transformers.AutoImageProcessor.from_pretrained(path, local_files_only=True)
            enc = proc(images=images, return_tensors="pt")
    except Exception as exc:  # no processor saved, or one that refuses these images
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise InputError(f"cannot prepare --image for {path}: {first}") from None
    return {k: v for k, v in enc.items() if isinstance(v, torch.Tensor)}


def _scipy(module: str) -> Any:
    """``scipy.<module>``, which ``--audio`` reads and resamples with (the ``capture``
    extra); its absence is one line naming the install command."""
    import importlib

    try:
        return importlib.import_module(f"scipy.{module}")
    except ImportError:
        raise InputError("--audio reads wav files with scipy, which is not installed: "
                         "pip install 'precision[capture]'") from None


def read_wav(file: Path) -> tuple[np.ndarray, int]:
    """A wav file as mono float32 in [-1, 1] and its sampling rate (scipy)."""
    wavfile = _scipy("io.wavfile")
    try:
        rate, data = wavfile.read(file)
    except (ValueError, OSError) as exc:
        raise InputError(f"--audio {file} is not a wav file scipy can read: {exc}") from None
    if np.issubdtype(data.dtype, np.integer):  # PCM: int16/int32 signed, uint8 offset
        info = np.iinfo(data.dtype)
        half = (int(info.max) + 1) / (1 if info.min < 0 else 2)
        data = (data.astype(np.float64) - (0 if info.min < 0 else half)) / half
    audio = np.asarray(data, dtype=np.float32)
    if audio.ndim == 2:
        audio = audio.mean(axis=1)
    if audio.size == 0:
        raise InputError(f"--audio {file} holds no samples")
    return audio, int(rate)


def _audio(path: Path, files: Sequence[str]) -> dict[str, torch.Tensor]:
    """``--audio`` wav files through the model's feature extractor, resampled to its rate."""
    import math

    import transformers

    resample_poly = _scipy("signal").resample_poly
    try:
        fe = transformers.AutoFeatureExtractor.from_pretrained(path, local_files_only=True)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise InputError(f"cannot prepare --audio for {path}: {first}") from None
    want = int(getattr(fe, "sampling_rate", 16000))
    clips = []
    for p in _open_files(files, "--audio"):
        audio, rate = read_wav(p)
        if rate != want:
            g = math.gcd(rate, want)
            audio = resample_poly(audio, want // g, rate // g).astype(np.float32)
        clips.append(audio)
    kw: dict[str, Any] = {"return_tensors": "pt", "sampling_rate": want}
    if len(clips) > 1 and not _pads_by_itself(fe):
        kw["padding"] = True  # clips of different lengths in one batch
    try:
        enc = fe(clips, **kw)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise InputError(f"cannot prepare --audio for {path}: {first}") from None
    return {k: v for k, v in enc.items() if isinstance(v, torch.Tensor)}


def _pads_by_itself(fe: Any) -> bool:
    """Whether a feature extractor pads every clip by default (Whisper pads to its window,
    ``padding="max_length"``, and needs exactly that length): ``padding=True`` would
    override it with the longest clip's length."""
    import inspect

    try:
        default = inspect.signature(fe.__call__).parameters["padding"].default
    except (KeyError, TypeError, ValueError):
        return False
    return bool(default) and default is not inspect.Parameter.empty


def read_feed(file: str) -> dict[str, torch.Tensor]:
    """``--feed``: named tensors from a ``.safetensors`` or ``.npz`` file, for ``forward``."""
    p = Path(file)
    if not p.is_file():
        raise InputError(f"--feed {p} does not exist")
    if p.suffix not in (".npz", ".safetensors"):
        raise InputError(f"--feed {p}: use a .safetensors or .npz file of named tensors")
    try:
        if p.suffix == ".npz":
            with np.load(p, allow_pickle=False) as z:
                arrays = {k: np.asarray(z[k]) for k in z.files}
            fed = {k: torch.from_numpy(np.ascontiguousarray(a)).reshape(a.shape)
                   for k, a in arrays.items()}
        else:
            from safetensors.torch import load_file

            fed = dict(load_file(str(p)))
    except Exception as exc:  # a corrupt or foreign file: one line
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise InputError(f"--feed {p} is not readable: {first}") from None
    if not fed:
        raise InputError(f"--feed {p} holds no tensor: give the model's inputs by name "
                         "(input_ids, attention_mask, pixel_values...)")
    for name, t in fed.items():
        if name.endswith("_ids") and t.ndim < 2:
            raise InputError(f"--feed {p}: {name} has shape {list(t.shape)}: give a batch of "
                             "ids (batch x length)")
    return fed


def to_model(inputs: dict[str, torch.Tensor], device: Any,
             dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Inputs on ``device``, floating ones (pixels, audio features) in the compute dtype."""
    return {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device))
            for k, v in inputs.items()}
