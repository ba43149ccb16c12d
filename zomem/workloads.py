"""Workloads: a fixed padded shape plus a loss, so every optimizer sees identical inputs.

Token ids are synthetic and seeded: memory and time depend on the shape, not on the text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from zomem.errors import UsageError
from zomem.registry import Registry

LossForm = Literal["classification", "multiple_choice", "generation"]
LOSS_FORMS: tuple[LossForm, ...] = ("classification", "multiple_choice", "generation")
BATCH_SEED = 1234


@dataclass(frozen=True)
class Workload:
    """A padded shape (``batch_size`` examples × ``candidates`` sequences of ``seq_len`` tokens) and a loss."""

    name: str
    batch_size: int
    seq_len: int
    loss: LossForm
    #: sequences forwarded per example (multiple choice forwards each option)
    candidates: int = 1
    #: label words (classification) or target tokens per sequence (multiple choice, generation)
    targets: int = 1
    #: where the shape comes from, and whether it is an assumption
    provenance: str = ""

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.seq_len < 2 or self.candidates < 1:
            raise UsageError(
                f"workload {self.name!r}: batch, candidates must be >= 1 and seq >= 2 "
                f"(got batch={self.batch_size}, seq={self.seq_len}, candidates={self.candidates})"
            )
        if self.loss not in LOSS_FORMS:
            raise UsageError(f"workload {self.name!r}: loss must be one of {', '.join(LOSS_FORMS)}")
        if self.loss == "classification" and self.candidates != 1:
            raise UsageError(f"workload {self.name!r}: classification forwards one sequence per example")
        if self.loss == "multiple_choice" and self.candidates < 2:
            raise UsageError(f"workload {self.name!r}: multiple choice needs candidates >= 2")
        if not 1 <= self.targets < self.seq_len and self.loss != "classification":
            raise UsageError(f"workload {self.name!r}: targets must be between 1 and seq-1")
        if self.loss == "classification" and self.targets < 2:
            raise UsageError(f"workload {self.name!r}: classification needs at least 2 label words")

    @property
    def sequences(self) -> int:
        """Sequences in one forward pass."""
        return self.batch_size * self.candidates

    def check_fits(self, positions: int) -> None:
        """Refuse a shape longer than the model's positions, before anything is allocated."""
        if self.seq_len > positions:
            raise UsageError(
                f"workload {self.name!r} has {self.seq_len} tokens per sequence; the model has only "
                f"{positions} positions. Use a shorter seq (e.g. custom:batch={self.batch_size},seq={positions})."
            )


WORKLOADS: Registry[Workload] = Registry("workload")
for _workload in (
    Workload(
        "sst2", 16, 64, "classification", targets=2,
        provenance="MeZO's SST-2 setting: batch 16, prompt '<S> It was great/terrible', loss over the two "
        "label words at the last position. seq 64 is an assumption: SST-2 sentences average ~20 words, "
        "so the template padded to the batch's longest fits in 64 tokens.",
    ),
    Workload(
        "copa", 16, 32, "multiple_choice", candidates=2, targets=8,
        provenance="MeZO's COPA setting: batch 16, each of the 2 options forwarded as its own sequence and "
        "scored by the log-likelihood of its tokens. seq 32 and 8 option tokens are assumptions: premise "
        "plus connective plus option is about 15-20 words.",
    ),
    Workload(
        "squad", 16, 256, "generation", targets=16,
        provenance="MeZO's SQuAD setting: batch 16, LM loss on the answer tokens. seq 256 and 16 answer "
        "tokens are assumptions: a SQuAD paragraph averages ~120 words, ~160 OPT tokens, plus the "
        "question and template, padded to the batch's longest.",
    ),
    Workload(
        "multirc", 1, 400, "classification", targets=2,
        provenance="The MeZO paper's memory measurement: MultiRC, batch 1, about 400 tokens on average "
        "(the paper's own figure), a yes/no label at the last position.",
    ),
    Workload(
        "long2048", 1, 2048, "generation", targets=2047,
        provenance="A stress shape, not a dataset statistic: one sequence filling OPT's 2048 positions, "
        "language-modelling loss on every next token.",
    ),
    Workload(
        "long4096", 1, 4096, "generation", targets=4095,
        provenance="A stress shape, not a dataset statistic: one sequence of 4096 tokens (Llama 2's context), "
        "language-modelling loss on every next token; longer than OPT's positions, so refused there.",
    ),
):
    WORKLOADS.register(_workload.name, _workload)

_CUSTOM_KEYS = {"batch": "batch_size", "seq": "seq_len", "candidates": "candidates", "targets": "targets",
                "loss": "loss"}


def parse_custom(text: str) -> Workload:
    """A workload from ``custom:batch=B,seq=S[,loss=classification|multiple_choice|generation,...]``."""
    body = text.removeprefix("custom:")
    values: dict[str, object] = {"loss": "generation"}
    for item in filter(None, body.split(",")):
        key, sep, value = item.partition("=")
        if not sep or key not in _CUSTOM_KEYS:
            raise UsageError(
                f"cannot read {item!r} in {text!r}: expected key=value with keys {', '.join(_CUSTOM_KEYS)}"
            )
        if key == "loss":
            values[key] = value
        elif re.fullmatch(r"\d+", value):
            values[_CUSTOM_KEYS[key]] = int(value)
        else:
            raise UsageError(f"{key} must be a whole number in {text!r}, got {value!r}")
    if "batch_size" not in values or "seq_len" not in values:
        raise UsageError(f"{text!r} needs at least batch= and seq=, e.g. custom:batch=8,seq=512")
    if values["loss"] == "multiple_choice":
        values.setdefault("candidates", 2)
    if values["loss"] == "classification":
        values.setdefault("targets", 2)
    return Workload(name=text, **values)  # type: ignore[arg-type]


def get(name: str) -> Workload:
    """A built-in workload by name, or a ``custom:`` one."""
    if name.startswith("custom:"):
        return parse_custom(name)
    return WORKLOADS.get(name)


def logits_bytes(workload: Workload, vocab: int, dtype: torch.dtype, batch_size: int | None = None) -> int:
    """Bytes of the logits one forward of ``workload`` makes (every position's, in the dtype the head's matmul
    runs in): with a large vocabulary, the largest tensor of a forward-only step."""
    sequences = (batch_size or workload.batch_size) * workload.candidates
    return sequences * workload.seq_len * vocab * dtype.itemsize


@dataclass
class Batch:
    """Synthetic inputs for one step: token ids, and what the loss compares them with."""

    input_ids: torch.Tensor  # (sequences, seq_len)
    attention_mask: torch.Tensor
    labels: torch.Tensor  # classification/multiple choice: (batch,), the right label word / option
    label_words: torch.Tensor  # classification: the vocabulary ids of the label words


def make_batch(workload: Workload, vocab_size: int, device: torch.device | str = "cpu",
               seed: int = BATCH_SEED) -> Batch:
    """The seeded synthetic batch for ``workload``, built on CPU then moved, so it is the same on every device."""
    generator = torch.Generator().manual_seed(seed)
    shape = (workload.sequences, workload.seq_len)
    input_ids = torch.randint(0, vocab_size, shape, generator=generator)
    labels_high = workload.targets if workload.loss == "classification" else workload.candidates
    labels = torch.randint(0, labels_high, (workload.batch_size,), generator=generator)
    label_words = torch.randperm(vocab_size, generator=generator)[: workload.targets].clone()  # not the whole perm
    return Batch(
        input_ids=input_ids.to(device),
        attention_mask=torch.ones(shape, dtype=torch.long, device=device),
        labels=labels.to(device),
        label_words=label_words.to(device),
    )


def loss(model: nn.Module, workload: Workload, batch: Batch) -> torch.Tensor:
    """One forward pass and the workload's loss, computed in float32 at least whatever the model dtype (in float64 for
    a float64 model, as the reference checks run)."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    wide = torch.promote_types(logits.dtype, torch.float32)
    if workload.loss == "classification":
        # MeZO-style prompting: the next-token scores of the label words at the last position
        scores = logits[:, -1, batch.label_words].to(wide)
        return F.cross_entropy(scores, batch.labels)
    # Position i predicts token i+1; the targets are each sequence's last `targets` tokens.
    predicted = logits[:, -workload.targets - 1 : -1].to(wide)
    targets = batch.input_ids[:, -workload.targets :]
    token_logprobs = -F.cross_entropy(predicted.transpose(1, 2), targets, reduction="none")
    if workload.loss == "generation":
        return -token_logprobs.mean()
    # Multiple choice: each option scored by its mean token log-likelihood, then a softmax over options.
    option_scores = token_logprobs.mean(dim=1).view(workload.batch_size, workload.candidates)
    return F.cross_entropy(option_scores, batch.labels)
