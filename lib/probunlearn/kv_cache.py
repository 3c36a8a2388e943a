"""A key/value cache allocated once per batch, for decoding (`sampling`) and for scoring answers after a
shared prompt (`likelihood.answer_nll`): its layers write into buffers sized up front instead of
concatenating a new tensor at every step, and keep one row per distinct prefix.

`SharedPrompt` keeps the prompt's keys and values once per prompt while many rows continue it (the n
answers to one question): the rows' buffers then hold only the generated positions, and
`attention.decode_attention` reads each prompt's keys once for all its rows (one matrix product per
prompt and key/value head) instead of once per row: the prompt is much of what a short answer
attends to, and one product over a prompt's rows costs far less than as many small ones
(`benchmarks/README.md`).
"""

from __future__ import annotations

import functools
import inspect

import torch

def kv_cache(capacity: int, row_capacity: int = 0):
    """A transformers Cache whose layers write into buffers of `capacity` positions (and room for
    `row_capacity` rows) allocated on the first update, instead of concatenating a new tensor at
    every step (which copies the whole cache once per token). Rows are the distinct prefixes being
    decoded: `place_rows(rows, targets, sources)` copies rows into others (a prefix that continues
    with several different tokens gets a row per token; a row whose answers ended is taken by
    another) and sets how many are held, `keep_rows(keep)` compacts the buffer to the rows listed.

    Buffers are (rows, heads, positions, dim) as allocated, and position-major, (positions, rows,
    heads, dim), for the generated positions after `split_prompt`: a decoding step then reads the
    cached part of each layer as one block of memory, where row-major it would read a strided run
    of blocks with the unused capacity between them. The batched products of
    `attention.decode_attention` compute the same numbers either way, in ~40 % less time on the
    AVX2 stand-in: there any gap of two positions or more made the reads ~3x slower
    (`benchmarks/README.md`). The layers hand out (rows, heads, positions, dim) views in both."""
    from transformers.cache_utils import Cache, DynamicLayer

    class PreallocatedLayer(DynamicLayer):
        capacity_left, offset = capacity, 0  # offset: the prompt positions a SharedPrompt holds

        def lazy_initialization(self, key_states, value_states):
            self.dtype, self.device = key_states.dtype, key_states.device
            rows, heads, _, dim = key_states.shape
            self._keys = key_states.new_empty(max(rows, row_capacity), heads, self.capacity_left, dim)
            self._values = value_states.new_empty(max(rows, row_capacity), heads, self.capacity_left,
                                                  value_states.shape[-1])
            self.rows, self.length = rows, 0
            self._views()
            self.is_initialized = True

        def split_prompt(self, capacity: int, row_capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
            """Hand over the positions cached so far (the prompts, one row each) and start buffers of
            `capacity` generated positions and `row_capacity` rows, holding the same rows, empty."""
            keys, values = self.keys.contiguous(), self.values.contiguous()
            _, heads, _, dim = self._keys.shape
            self.offset, self.capacity_left = self.length, capacity
            self._keys = self._keys.new_empty(capacity, max(self.rows, row_capacity), heads, dim)
            self._values = self._values.new_empty(capacity, max(self.rows, row_capacity), heads,
                                                  self._values.shape[-1])
            self.position_major, self.length = True, 0
            self._views()
            return keys, values

        position_major = False  # buffers (rows, heads, positions, dim); after split_prompt (positions, rows, ...)

        def _logical(self, buffer: torch.Tensor) -> torch.Tensor:
            """`buffer` (or a part of it cut along its positions) as a (rows, heads, positions, dim) view."""
            return buffer.permute(1, 2, 0, 3) if self.position_major else buffer

        def _region(self, buffer: torch.Tensor, rows: slice) -> torch.Tensor:
            """The cached positions of `rows` in `buffer`, (rows, heads, positions, dim)."""
            return self._logical(buffer)[rows, :, :self.length]

        def _views(self):
            self.keys, self.values = (self._region(buffer, slice(self.rows)) for buffer in (self._keys, self._values))

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            end = self.length + key_states.shape[-2]
            if end > self.capacity_left:
                raise RuntimeError(f"key/value cache of {self.offset + self.capacity_left} positions is full")
            if key_states.shape[0] != self.rows:
                raise RuntimeError(f"the cache holds {self.rows} rows but the model ran {key_states.shape[0]}")
            self._logical(self._keys)[:self.rows, :, self.length:end] = key_states
            self._logical(self._values)[:self.rows, :, self.length:end] = value_states
            self.length = end
            self._views()
            return self.keys, self.values

        def get_seq_length(self) -> int:
            return self.offset + self.length if self.is_initialized else 0

        def get_max_length(self) -> int:
            return self.offset + self.capacity_left

        def place_rows(self, rows: int, targets: torch.Tensor, sources: torch.Tensor) -> None:
            """Hold `rows` rows from now on, row targets[i] a copy of row sources[i]: rows past the
            current ones are added (the buffers grow if they must), rows from `rows` on are dropped,
            the others stay where they are. Every source is read before any target is written."""
            if not self.is_initialized:
                return
            axis = int(self.position_major)
            if rows > self._keys.shape[axis]:  # grow (rare: the room is sized for the batch)
                for name in ("_keys", "_values"):
                    old = getattr(self, name)
                    shape = list(old.shape)
                    shape[axis] = max(rows, 2 * shape[axis])
                    new = old.new_empty(shape)
                    self._region(new, slice(self.rows)).copy_(self._region(old, slice(self.rows)))
                    setattr(self, name, new)
            if len(targets):
                for buffer in (self._keys, self._values):
                    cached = self._cached(buffer)
                    cached.index_copy_(axis, targets, cached.index_select(axis, sources))
            self.rows = rows
            self._views()

        def keep_rows(self, keep: torch.Tensor) -> None:
            if not self.is_initialized:
                return
            kept = slice(len(keep))
            self._region(self._keys, kept).copy_(self._rows_of(self._keys, keep))  # a copy, then written
            self._region(self._values, kept).copy_(self._rows_of(self._values, keep))
            self.rows = len(keep)
            self._views()

        def _rows_of(self, buffer: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
            """A copy of the cached positions of `rows`, (rows, heads, positions, dim): `index_select`
            along the buffer's row axis, the same numbers as advanced indexing, ~3.5x as fast as
            `buffer[rows, :, :length]` row-major on a CPU for these shapes (position-major it was not
            compared)."""
            return self._logical(self._cached(buffer).index_select(int(self.position_major), rows))

        def _cached(self, buffer: torch.Tensor) -> torch.Tensor:
            """The cached positions of every row of `buffer`, in the buffer's own layout (its row axis
            is 1 position-major, else 0)."""
            return buffer[:self.length] if self.position_major else buffer[:, :, :self.length]

        def batch_select_indices(self, indices: torch.Tensor) -> None:
            self.keep_rows(indices)

        def crop(self, tokens_to_remove: int) -> None:  # pragma: no cover - not used here
            raise NotImplementedError

    return Cache(layer_class_to_replicate=PreallocatedLayer)


class SharedPrompt:
    """The prompts' keys and values of a `kv_cache` after its prompts were run (one row per prompt),
    kept once: `SharedPrompt(cache, capacity, row_capacity, prompt_mask)` moves them out of every layer's
    buffers, which then hold `capacity` generated positions for up to `row_capacity` rows. The prompts'
    padding comes from `prompt_mask` (prompts x positions, 0 at padding; None: none), added to their
    scores once per prompt; the generated positions are all attended, so the attention needs no mask
    (the model's forward call may pass `attention_mask=None`; one passed is not read). Before each decoding
    step, `set_rows(row_prompt)` says which prompt each row of the cache continues; pass the object
    to the model's forward call as `shared_prompt=` (transformers hands it to the attention function,
    which must be `attention.decode_attention`: the cache's layers return the generated positions only).

    For its products, the rows of each prompt are gathered into a padded block of `width` rows
    (`order`: prompts x width row indices, padding repeats row 0) and read back by (prompt, place).
    Both are single `index_select`s of vectors (`_gather`: `order` as indices of (row, key/value head,
    group) in the blocks' order; `back`: each (row, key/value head) in the products' output): the same
    numbers as advanced indexing and a transposed copy, in less time (`benchmarks/README.md`)."""

    def __init__(self, cache, capacity: int, row_capacity: int, prompt_mask: torch.Tensor | None = None):
        self.layers = [layer.split_prompt(capacity, row_capacity) for layer in cache.layers]
        keys = self.layers[0][0]
        self.prompts, self.kv_heads, self.length, _ = keys.shape
        # the prompts' padding (prompt_mask 0: left padding) as -inf added to their scores, once per prompt
        bias = torch.zeros(self.prompts, self.length, dtype=keys.dtype, device=keys.device)
        if prompt_mask is not None:
            bias = bias.masked_fill(prompt_mask.to(keys.device) == 0, float("-inf"))
        self.bias = bias[:, None, None, :].expand(-1, self.kv_heads, 1, -1).reshape(
            self.prompts * self.kv_heads, 1, self.length)
        self.set_rows(torch.arange(self.prompts, device=keys.device))

    def set_rows(self, row_prompt: torch.Tensor) -> None:
        counts = torch.bincount(row_prompt, minlength=self.prompts)
        self.width = int(counts.max())
        by_prompt = torch.argsort(row_prompt, stable=True)
        prompt = row_prompt[by_prompt]
        place = torch.arange(len(row_prompt), device=row_prompt.device) - (counts.cumsum(0) - counts)[prompt]
        self.order = torch.zeros(self.prompts, self.width, dtype=torch.long, device=row_prompt.device)
        self.order[prompt, place] = by_prompt
        row_place = torch.empty_like(row_prompt)
        row_place[by_prompt] = place
        # row r, key/value head h sits at (prompt, h, place) of the products' (prompts, kv_heads, width) blocks
        heads = torch.arange(self.kv_heads, device=row_prompt.device)
        self.back = ((row_prompt[:, None] * self.kv_heads + heads) * self.width + row_place[:, None]).view(-1)
        self._gathers = {}  # groups -> `order` as (row, head, group) indices, in the blocks' order

    def _by_prompt(self, per_row: torch.Tensor, layer: int, part: int, scaling: float = 1.0) -> torch.Tensor:
        """per_row (rows, kv_heads, groups, k) times each row's prompt keys (part 0, transposed: k = dim;
        times `scaling`, plus the padding's -inf) or values (part 1: k = prompt positions) ->
        (rows, kv_heads, groups, positions or dim)."""
        store = self.layers[layer][part]  # (prompts, kv_heads, positions, dim)
        _, kv_heads, groups, k = per_row.shape
        block = per_row.reshape(-1, k).index_select(0, self._gather(groups))
        block = block.view(self.prompts * kv_heads, self.width * groups, k)
        other = store.reshape(self.prompts * kv_heads, *store.shape[2:])
        if part == 0:
            out = torch.baddbmm(self.bias, block, other.transpose(1, 2), alpha=scaling)
        else:
            out = torch.bmm(block, other)
        n = out.shape[-1]  # out: (prompts x kv_heads, width x groups, n), a block per (prompt, head, place)
        return out.view(-1, groups * n).index_select(0, self.back).view(-1, kv_heads, groups, n)

    def _gather(self, groups: int) -> torch.Tensor:
        """Indices into per-row vectors (rows x kv_heads x groups of them) that gather the rows of
        each prompt into the products' blocks, (prompt, key/value head, place, group) in order."""
        if groups not in self._gathers:
            heads = torch.arange(self.kv_heads, device=self.order.device)
            rows = self.order[:, None, :] * self.kv_heads + heads[None, :, None]  # (prompts, kv_heads, width)
            self._gathers[groups] = (rows[..., None] * groups + torch.arange(groups, device=rows.device)).view(-1)
        return self._gathers[groups]

    def scores(self, packed: torch.Tensor, layer: int, scaling: float = 1.0) -> torch.Tensor:
        """packed queries (rows, kv_heads, groups, dim) -> scores over the prompt positions, times
        `scaling`, -inf at the prompt's padding."""
        return self._by_prompt(packed, layer, 0, scaling)

    def weighted(self, weights: torch.Tensor, layer: int) -> torch.Tensor:
        """attention weights over the prompt positions (rows, kv_heads, groups, positions) -> values."""
        return self._by_prompt(weights, layer, 1)


@functools.lru_cache(maxsize=None)
def cache_keyword(model_class: type) -> str:
    """The name under which `model_class.forward` takes a key/value cache: `cache` since
    transformers deprecated `past_key_values` (5.24, removal in 5.40), `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def cache_argument(model, cache) -> dict:
    """`{name: cache}` for a forward call of `model` (a transformers or peft model)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return {cache_keyword(type(inner)): cache}
