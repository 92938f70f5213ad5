"""Tensor parallelism: which KV heads this rank's attention modules hold.

Transformers' tensor parallelism (``from_pretrained(..., tp_plan="auto")`` or
``distributed_config=DistributedConfig(tp_size=N)``, under ``torchrun``) shards ``q_proj``, ``k_proj`` and
``v_proj`` column-wise: on rank ``r`` of ``N`` every attention module sees the query heads
``[r * Hq / N, (r + 1) * Hq / N)`` and the KV heads ``[r * Hkv / N, (r + 1) * Hkv / N)`` (a ``Shard(0)``
of the weight: contiguous, in order). The model records it as ``model._tp_size`` and
``model._device_mesh`` (a mesh with a ``"tp"`` dimension). The plugin's labels are per (layer, KV
head) of the whole model, so a rank keeps the columns of its slice; everything per head downstream
(``SparseCache`` buffers, the attention dispatch) is then built from those columns.

``kv_head_slice`` answers which slice; the attention function checks at run time that the heads it
receives are that slice's count (``check_heads``), so a sharding this module does not know about
(a model sharded by hand, a custom plan) raises instead of mixing up heads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# projections whose output holds the keys; "colwise" shards them by head (Transformers' own rule in
# ``get_kv_heads_per_rank``); "colwise_rep"/"colwise_gather_output" gather the full output again
_KEY_PROJECTIONS = ("k_proj", "qkv_proj", "query_key_value")


@dataclass(frozen=True)
class KVHeadSlice:
    """KV heads ``[start, stop)`` of ``num_kv_heads`` held by tensor-parallel rank ``rank`` of ``world_size``."""

    start: int
    stop: int
    num_kv_heads: int
    rank: int = 0
    world_size: int = 1

    @property
    def sharded(self) -> bool:
        return (self.start, self.stop) != (0, self.num_kv_heads)

    @property
    def count(self) -> int:
        return self.stop - self.start

    def describe(self) -> str:
        return (f"tensor-parallel rank {self.rank} of {self.world_size} holds KV heads "
                f"[{self.start}, {self.stop}) of {self.num_kv_heads}")


def tensor_parallel_world(model) -> tuple[int, int]:
    """(rank, size) of ``model``'s tensor-parallel group; (0, 1) for a model that is not sharded."""
    size = int(getattr(model, "_tp_size", None) or 1)
    if size <= 1:
        return 0, 1
    mesh = getattr(model, "_device_mesh", None)
    if mesh is not None:
        names = tuple(mesh.mesh_dim_names or ())
        if "tp" in names:
            mesh = mesh["tp"]
        elif mesh.ndim != 1:
            raise ValueError(f"the model's device mesh {names} has no 'tp' dimension: cannot tell this rank's heads.")
        if mesh.size() != size:
            raise ValueError(f"the model's tensor-parallel mesh has {mesh.size()} ranks but model._tp_size is {size}.")
        return int(mesh.get_local_rank()), size
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        if torch.distributed.get_world_size() != size:
            raise ValueError(
                f"model._tp_size is {size} in a world of {torch.distributed.get_world_size()} processes and the model "
                "has no device mesh: cannot tell this rank's tensor-parallel position."
            )
        return torch.distributed.get_rank(), size
    raise ValueError(f"model._tp_size is {size} but torch.distributed is not initialized.")


def _plan_shards_kv_heads(model) -> bool:
    plan = getattr(model, "_tp_plan", None)
    if plan is None:  # no plan recorded: assume the standard one (heads sharded); check_heads guards it
        return True
    return any(name.rsplit(".", 1)[-1] in _KEY_PROJECTIONS and style == "colwise" for name, style in plan.items())


def kv_head_slice(model, num_kv_heads: int) -> KVHeadSlice:
    """The KV heads this process's attention modules hold: all of them, or this rank's tensor-parallel
    slice ``[rank * n / size, (rank + 1) * n / size)``. ``ValueError`` when ``n`` does not divide."""
    rank, size = tensor_parallel_world(model)
    if size == 1 or not _plan_shards_kv_heads(model):
        return KVHeadSlice(0, num_kv_heads, num_kv_heads, rank, size)
    if num_kv_heads % size:
        raise ValueError(
            f"the model has {num_kv_heads} KV heads, which tensor parallelism over {size} ranks cannot split by "
            f"head (k_proj/v_proj are sharded column-wise, so a rank would hold part of a head). sparse_attn_hf "
            f"labels whole KV heads: use a tensor-parallel size that divides {num_kv_heads}, or device_map."
        )
    per_rank = num_kv_heads // size
    return KVHeadSlice(rank * per_rank, (rank + 1) * per_rank, num_kv_heads, rank, size)


def check_heads(heads: KVHeadSlice, module, query_heads: int, kv_heads: int) -> None:
    """Raise unless the attention call's heads are ``heads``' count of KV heads with their query groups."""
    groups = getattr(module, "num_key_value_groups", 1)
    if kv_heads == heads.count and query_heads == kv_heads * groups:
        return
    where = heads.describe() if heads.world_size > 1 else "the model is not tensor-parallel (no model._tp_size)"
    raise ValueError(
        f"layer {getattr(module, 'layer_idx', '?')} received {query_heads} query and {kv_heads} KV heads, but "
        f"sparse_attn_hf expected {heads.count * groups} and {heads.count} ({where}). The model's heads are sharded in "
        "a way the plugin does not know (a model sharded by hand, or a tensor-parallel plan that does not shard "
        "q_proj, k_proj and v_proj column-wise by head); its per-head labels would land on the wrong heads. Load it "
        "with from_pretrained(..., tp_plan='auto') and its standard plan, or without tensor parallelism."
    )


__all__ = ["KVHeadSlice", "tensor_parallel_world", "kv_head_slice", "check_heads"]
