"""A key/value cache allocated once per batch, for decoding (`sampling`) and for scoring answers after a
shared prompt (`likelihood.answer_nll`): its layers write into buffers sized up front instead of
concatenating a new tensor at every step, and keep one row per distinct prefix.
"""

from __future__ import annotations

import functools
import inspect

import torch

def kv_cache(capacity: int, row_capacity: int = 0):
    """A transformers Cache whose layers write into buffers of `capacity` positions (and room for
    `row_capacity` rows) allocated on the first update, instead of concatenating a new tensor at
    every step (which copies the whole cache once per token). Rows are the distinct prefixes being
    decoded: `add_rows(parents)` appends copies of existing rows (a prefix that continues with
    several different tokens), `keep_rows(keep)` compacts the buffer to the rows still needed."""
    from transformers.cache_utils import Cache, DynamicLayer

    class PreallocatedLayer(DynamicLayer):
        def lazy_initialization(self, key_states, value_states):
            self.dtype, self.device = key_states.dtype, key_states.device
            rows, heads, _, dim = key_states.shape
            self._keys = key_states.new_empty(max(rows, row_capacity), heads, capacity, dim)
            self._values = value_states.new_empty(max(rows, row_capacity), heads, capacity, value_states.shape[-1])
            self.rows, self.length = rows, 0
            self._views()
            self.is_initialized = True

        def _views(self):
            self.keys = self._keys[:self.rows, :, :self.length]
            self.values = self._values[:self.rows, :, :self.length]

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            end = self.length + key_states.shape[-2]
            if end > capacity:
                raise RuntimeError(f"key/value cache of {capacity} positions is full")
            if key_states.shape[0] != self.rows:
                raise RuntimeError(f"the cache holds {self.rows} rows but the model ran {key_states.shape[0]}")
            self._keys[:self.rows, :, self.length:end] = key_states
            self._values[:self.rows, :, self.length:end] = value_states
            self.length = end
            self._views()
            return self.keys, self.values

        def get_seq_length(self) -> int:
            return self.length if self.is_initialized else 0

        def get_max_length(self) -> int:
            return capacity

        def add_rows(self, parents: torch.Tensor) -> None:
            if not self.is_initialized:
                return
            need = self.rows + len(parents)
            if need > self._keys.shape[0]:  # grow (rare: the room is sized for the batch)
                for name in ("_keys", "_values"):
                    old = getattr(self, name)
                    new = old.new_empty(max(need, 2 * old.shape[0]), *old.shape[1:])
                    new[:self.rows, :, :self.length] = old[:self.rows, :, :self.length]
                    setattr(self, name, new)
            self._keys[self.rows:need, :, :self.length] = self._keys[parents, :, :self.length]
            self._values[self.rows:need, :, :self.length] = self._values[parents, :, :self.length]
            self.rows = need
            self._views()

        def keep_rows(self, keep: torch.Tensor) -> None:
            if not self.is_initialized:
                return
            self._keys[:len(keep), :, :self.length] = self._keys[keep, :, :self.length]  # the index copies first
            self._values[:len(keep), :, :self.length] = self._values[keep, :, :self.length]
            self.rows = len(keep)
            self._views()

        def batch_select_indices(self, indices: torch.Tensor) -> None:
            self.keep_rows(indices)

        def crop(self, tokens_to_remove: int) -> None:  # pragma: no cover - not used here
            raise NotImplementedError

    return Cache(layer_class_to_replicate=PreallocatedLayer)


@functools.lru_cache(maxsize=None)
def cache_keyword(model_class: type) -> str:
    """The name under which `model_class.forward` takes a key/value cache: `cache` since
    transformers deprecated `past_key_values` (5.24, removal in 5.40), `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def cache_argument(model, cache) -> dict:
    """`{name: cache}` for a forward call of `model` (a transformers or peft model)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return {cache_keyword(type(inner)): cache}
