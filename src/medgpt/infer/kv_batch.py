"""The transformers engine's running batch: its rows and their shared KV cache, left-padded, which rows join
(`add`), leave (`keep`), or step alone after a failed forward (`part`, `crop`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from medgpt.infer.engine import Row


def cache_of(layers: list[tuple[Any, Any]]):
    """A transformers DynamicCache holding these (keys, values) per layer."""
    from transformers import DynamicCache

    return DynamicCache(ddp_cache_data=layers)


def layers_of(cache) -> list[tuple[Any, Any]]:
    return [(layer.keys, layer.values) for layer in cache.layers]


class Batch:
    """The running rows and their shared KV cache ([rows, heads, width, dim] per layer, each row left-padded)."""

    def __init__(self):
        self.rows: list[Row] = []
        self.cache = None  # a DynamicCache
        self.mask = None  # [rows, width]: 1 where a real token is cached

    def add(self, rows: list[Row], cache, mask) -> None:
        """Append rows with their own cache (of any width): both sides are left-padded to the wider one."""
        import torch
        from torch.nn.functional import pad

        if not self.rows:
            self.rows, self.cache, self.mask = list(rows), cache, mask
            return
        old, new = self.mask.shape[1], mask.shape[1]
        width = max(old, new)

        def widen(t, w):  # left padding of a cache tensor (dim -2) or a mask (dim -1)
            return pad(t, (0, 0, width - w, 0)) if t.dim() == 4 else pad(t, (width - w, 0))

        self.cache = cache_of([(torch.cat([widen(k, old), widen(k2, new)]), torch.cat([widen(v, old), widen(v2, new)]))
                               for (k, v), (k2, v2) in zip(layers_of(self.cache), layers_of(cache))])
        self.mask = torch.cat([widen(self.mask, old), widen(mask, new)])
        self.rows += rows

    def keep(self, indices: list[int]) -> None:
        """Keep only these rows; cache columns that are padding in every remaining row are cut."""
        import torch

        if len(indices) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in indices]
        if not self.rows:
            self.cache = self.mask = None
            return
        index = torch.tensor(indices, device=self.mask.device)
        mask = self.mask[index]
        start = int((mask.sum(0) > 0).int().argmax())  # the first column a row uses
        self.mask = mask[:, start:]
        for layer in self.cache.layers:
            layer.keys, layer.values = layer.keys[index, :, start:], layer.values[index, :, start:]

    def crop(self, width: int) -> None:
        """Undo a forward that failed part way: every layer back to `width` columns."""
        for layer in self.cache.layers:
            layer.keys, layer.values = layer.keys[:, :, :width], layer.values[:, :, :width]

    def part(self, i: int):
        """Row i's cache and mask alone, without its padding."""
        start = int(self.mask[i].argmax())
        return (cache_of([(k[i:i + 1, :, start:], v[i:i + 1, :, start:]) for k, v in layers_of(self.cache)]),
                self.mask[i:i + 1, start:])
