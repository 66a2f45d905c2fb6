"""Calibration token rows from a text file, a JSON-lines file, or a named public set.

Why it exists: quantization quality depends on which tokens the Hessians see; the rows must be
deterministic (same source, tokenizer, nsamples, seqlen, seed → same rows) because they are part of
the resume fingerprint.

What must stay true:
- `.txt`: the whole text is tokenized as one stream and cut into `nsamples` windows of `seqlen` tokens,
  evenly spread over the stream (a seeded jitter inside each slot), non-overlapping;
- `.jsonl`: one sample per row (field "text", or "input_ids" for rows tokenized elsewhere, e.g. to give
  two tools the very same rows), rows in order, each truncated to `seqlen` tokens;
- fewer windows than asked → a warning and what there is; less than one window → CalibrationError
  naming how many tokens were found and needed.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch

log = logging.getLogger(__name__)

NAMED_SETS = {
    # name: (datasets args, split, text field)
    "wikitext2": (("wikitext", "wikitext-2-raw-v1"), "train", "text"),
    "c4": (("allenai/c4",), "validation", "text"),
}


class CalibrationError(ValueError):
    pass


def load_calibration(source: str, tokenizer, *, nsamples: int, seqlen: int, seed: int = 0) -> list[torch.Tensor]:
    """Token rows (1-D int64 tensors, each ≤ seqlen long) for `source`."""
    if nsamples < 1 or seqlen < 2:
        raise CalibrationError(f"need nsamples >= 1 and seqlen >= 2, got {nsamples} and {seqlen}")
    if source in NAMED_SETS:
        return _rows_from_texts(_download_named(source, nsamples), tokenizer, nsamples, seqlen)
    path = Path(source)
    if not path.is_file():
        raise CalibrationError(f"calibration file not found: {source} "
                               f"(give a .txt or .jsonl file, or one of {', '.join(NAMED_SETS)})")
    if path.suffix == ".jsonl":
        return _rows_from_texts(_read_jsonl(path), tokenizer, nsamples, seqlen)
    return _windows_from_stream(_read_text(path), tokenizer, nsamples, seqlen, seed)


def rows_digest(rows: list[torch.Tensor]) -> str:
    h = hashlib.sha256()
    for row in rows:
        h.update(row.numpy().astype("<i8").tobytes())
        h.update(b"|")
    return h.hexdigest()


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise CalibrationError(f"calibration file {path} is not UTF-8 text: {exc}") from None


def _read_jsonl(path: Path) -> list[str | list[int]]:
    """Texts, or lists of token ids where a row carries "input_ids"."""
    samples = []
    for number, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            samples.append([int(i) for i in row["input_ids"]] if "input_ids" in row else str(row["text"]))
        except (ValueError, KeyError, TypeError):
            raise CalibrationError(f"{path} line {number}: expected a JSON object with a \"text\" "
                                   "or \"input_ids\" field") from None
    return samples


def _windows_from_stream(text: str, tokenizer, nsamples: int, seqlen: int, seed: int) -> list[torch.Tensor]:
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    available = ids.numel() // seqlen
    if available < 1:
        raise CalibrationError(f"calibration text too short: {ids.numel()} tokens found, "
                               f"at least {seqlen} needed for one window of --seqlen {seqlen}")
    if available < nsamples:
        log.warning("calibration text gives only %d windows of %d tokens (asked for %d); using %d",
                    available, seqlen, nsamples, available)
        nsamples = available
    slot = ids.numel() // nsamples  # ≥ seqlen: each window lies inside its own slot
    generator = torch.Generator().manual_seed(seed)
    jitter = torch.randint(0, slot - seqlen + 1, (nsamples,), generator=generator)
    return [ids[k * slot + int(jitter[k]): k * slot + int(jitter[k]) + seqlen].clone() for k in range(nsamples)]


def _rows_from_texts(texts, tokenizer, nsamples: int, seqlen: int) -> list[torch.Tensor]:
    rows = []
    for sample in texts:
        ids = (sample if isinstance(sample, list) else tokenizer(sample)["input_ids"])[:seqlen]
        if len(ids) >= 2:
            rows.append(torch.tensor(ids, dtype=torch.long))
        if len(rows) == nsamples:
            break
    if not rows:
        raise CalibrationError("calibration source holds no row of at least 2 tokens")
    if len(rows) < nsamples:
        log.warning("calibration source gives only %d rows (asked for %d); using %d", len(rows), nsamples, len(rows))
    return rows


def _download_named(name: str, nsamples: int) -> list[str]:
    try:
        import datasets
    except ImportError:
        raise CalibrationError(f"--calib {name} needs the `datasets` package: pip install 'leanfoem[datasets]'") from None
    args, split, field = NAMED_SETS[name]
    try:
        data = datasets.load_dataset(*args, split=split, streaming=True)
        texts = []
        for row in data:
            if row[field].strip():
                texts.append(row[field])
            if len(texts) >= 4 * nsamples:
                break
        return texts
    except Exception as exc:
        raise CalibrationError(f"cannot fetch calibration set {name!r} (offline?): {type(exc).__name__}: "
                               f"{str(exc).splitlines()[0] if str(exc) else ''}") from None
