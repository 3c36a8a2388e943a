"""The positions that predict answer tokens (SPEC §1: losses and likelihoods read answer tokens only),
shared by training, the unlearning objectives and the likelihood metrics: the packed logits of those
positions (`AnswerLogits`), the answer-only loss, and `FrozenTrunk`, which computes the frozen blocks
below a LoRA adapter once per sequence.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass

import torch

# Model types whose causal-LM forward is exactly `lm_head(decoder(...).last_hidden_state)` (no logit
# soft-capping or scaling), so the head can be applied to chosen positions only.
PLAIN_HEAD_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "phi", "phi3")


@dataclass
class AnswerLogits:
    """The logits of the positions that predict answer tokens, packed: `logits` (tokens x vocabulary,
    float32), `targets` (the answer token each row predicts), `rows` (its sequence in the batch) and
    `num_rows` (sequences in the batch). Position t predicts token t + 1 (SPEC §1: answer tokens
    and the closing EOS only)."""

    logits: torch.Tensor
    targets: torch.Tensor
    rows: torch.Tensor
    num_rows: int


def answer_positions(labels: torch.Tensor) -> torch.Tensor:
    """Boolean (rows x positions - 1): True where position t predicts an answer token (labels[t + 1])."""
    return labels[:, 1:] != -100


def pack_answer_logits(logits: torch.Tensor, labels: torch.Tensor) -> AnswerLogits:
    """`AnswerLogits` from the full (rows x positions x vocabulary) logits of a batch."""
    mask = answer_positions(labels)
    if not mask.any():
        raise ValueError("the batch has no answer tokens (all labels are -100)")
    return AnswerLogits(logits[:, :-1][mask].float(), labels[:, 1:][mask], mask.nonzero()[:, 0], labels.shape[0])


def _inner(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _plain_head(model) -> bool:
    return getattr(_inner(model).config, "model_type", None) in PLAIN_HEAD_MODEL_TYPES


class FrozenTrunk:
    """The transformer blocks below the lowest adapted (LoRA) block never change while the adapter
    trains, and neither does what they compute for a given sequence. A `FrozenTrunk` computes the
    hidden state that enters the lowest adapted block once per sequence and keeps it; every later
    forward pass of that sequence (each epoch of fine-tuning, each step and each reference pass of
    unlearning, with the adapter disabled or scaled) runs only the blocks above. With the adapter on
    the top 10 of SmolLM2's 30 blocks, a CPU training step takes ~0.6x the time
    (`benchmarks/training.py`). Exact up to float rounding (the kept states were computed in another
    batch); the tests compare it with the plain forward.

    It switches itself off (plain forward passes) when the adapter reaches the lowest block, when
    something outside the blocks is trained, or for a model type outside `PLAIN_HEAD_MODEL_TYPES`.
    The kept states belong to one set of frozen weights: make a new trunk for another model."""

    def __init__(self, model):
        self.model = model
        inner = _inner(model)
        self.decoder = inner.get_decoder() if hasattr(inner, "get_decoder") else None
        layers = [int(m.group(1)) if (m := re.search(r"\.layers\.(\d+)\.", name)) else None
                  for name, p in model.named_parameters() if p.requires_grad]
        self.first = min(layers) if layers and None not in layers else 0
        self.norm_name = next((n for n in ("norm", "final_layernorm") if hasattr(self.decoder, n)), None)
        self.enabled = (_plain_head(model) and self.first > 0 and self.norm_name is not None
                        and isinstance(getattr(self.decoder, "layers", None), torch.nn.ModuleList))
        self._states: dict[tuple[int, ...], tuple[int | None, torch.Tensor]] = {}  # row -> (pad id, states)

    @contextlib.contextmanager
    def _blocks(self, blocks, norm):
        layers, final = self.decoder.layers, getattr(self.decoder, self.norm_name)
        self.decoder.layers = torch.nn.ModuleList(blocks)
        setattr(self.decoder, self.norm_name, norm)
        try:
            yield
        finally:
            self.decoder.layers = layers
            setattr(self.decoder, self.norm_name, final)

    def _fill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, rows: list[tuple[int, ...]]) -> None:
        """Compute the kept states of the rows that lack them, or lack the padding positions this
        batch has: a padding position's state depends on its row's tokens and on where it sits (its
        query attends to the row's tokens; padding keys are masked), so it is kept per row too."""
        width, pad = input_ids.shape[1], input_ids[attention_mask == 0]
        pad_id = int(pad[0]) if pad.numel() else None
        need = [i for i, r in enumerate(rows) if r not in self._states or self._states[r][1].shape[0] < width
                or (pad_id is not None and self._states[r][0] not in (None, pad_id))]
        if not need:
            return
        index = torch.tensor(need, device=input_ids.device)
        with torch.no_grad(), self._blocks(list(self.decoder.layers[:self.first]), torch.nn.Identity()):
            states = self.decoder(input_ids=input_ids[index], attention_mask=attention_mask[index]).last_hidden_state
        for k, i in enumerate(need):
            row_pad = pad_id if len(rows[i]) < width else None
            self._states[rows[i]] = (row_pad, states[k].detach())

    def hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The decoder's last hidden state (after its final norm) for a right-padded batch, padding
        positions included (their states are kept per row and position too)."""
        if not self.enabled:
            return self.decoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        lengths = attention_mask.sum(dim=1).tolist()
        if any(attention_mask[i, n:].any() or not attention_mask[i, :n].all() for i, n in enumerate(lengths)):
            raise ValueError("FrozenTrunk takes right-padded batches (as encode_qa makes them)")
        rows = [tuple(input_ids[i, :n].tolist()) for i, n in enumerate(lengths)]
        self._fill(input_ids, attention_mask, rows)
        width = input_ids.shape[1]
        embeds = torch.stack([self._states[r][1][:width] for r in rows])
        with self._blocks(list(self.decoder.layers[self.first:]), getattr(self.decoder, self.norm_name)):
            return self.decoder(inputs_embeds=embeds, attention_mask=attention_mask).last_hidden_state

    def logits(self, batch: dict) -> torch.Tensor:
        """The model's logits on every position of `batch`, padding included (what
        `model(**batch).logits` gives)."""
        if not self.enabled:
            return self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return _inner(self.model).get_output_embeddings()(self.hidden(batch["input_ids"], batch["attention_mask"]))


def answer_logits(model, batch: dict, trunk: FrozenTrunk | None = None) -> AnswerLogits:
    """The model's logits at the positions that predict answer tokens only (`AnswerLogits`).

    For the model types in `PLAIN_HEAD_MODEL_TYPES` the output head runs on those positions alone:
    on a QA batch that is ~40 % of the positions, and the head (576 x 49152 for SmolLM2) is a fifth
    of a token's compute, so a CPU training step takes ~0.8x the time (`benchmarks/training.py`).
    Other models run their usual forward (the same numbers, with the head on every position).
    `trunk`: a `FrozenTrunk` of this model, to skip the frozen blocks below the adapter."""
    labels = batch["labels"]
    if not _plain_head(model):
        return pack_answer_logits(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                                  labels)
    mask = answer_positions(labels)
    if not mask.any():
        raise ValueError("the batch has no answer tokens (all labels are -100)")
    inner = _inner(model)
    if trunk is not None:
        hidden = trunk.hidden(batch["input_ids"], batch["attention_mask"])
    else:
        hidden = inner.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    logits = inner.get_output_embeddings()(hidden[:, :-1][mask])
    return AnswerLogits(logits.float(), labels[:, 1:][mask], mask.nonzero()[:, 0], labels.shape[0])


def answer_loss(model, batch: dict, trunk: FrozenTrunk | None = None) -> torch.Tensor:
    """Token-mean NLL of the answer tokens of a batch: the same number as a Hugging Face model's
    `.loss` on `encode_qa` labels, with the output head on answer positions only (`answer_logits`)."""
    out = answer_logits(model, batch, trunk)
    return torch.nn.functional.cross_entropy(out.logits, out.targets)
