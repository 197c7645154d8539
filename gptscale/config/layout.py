"""The layout of a run: how its ranks split the model and the batch, and the one way it is written down."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional


@dataclass(frozen=True)
class Layout:
    """Rank counts and batch arithmetic derived from a config and a world size (``config.check``)."""

    world_size: int
    tp: int
    pp: int
    vpp: int  # model chunks per pipeline rank (1 without interleaving)
    dp: int
    micro_batch: int
    global_batch: int
    ep: int = 1  # expert parallel: carved out of the data-parallel ranks
    sp: bool = False  # sequence parallel within the tensor-parallel group
    zero: int = 0  # DeepSpeed ZeRO stage
    cp: int = 1  # context parallel: ranks that split each sequence

    @property
    def num_microbatches(self) -> int:
        """Micro-batches each data-parallel rank runs per optimizer step (gradient accumulation)."""
        return self.global_batch // (self.micro_batch * self.dp)

    @property
    def expert_dp(self) -> int:
        """Copies of each expert: the ranks that hold the same experts, context-parallel ones included. Also
        the ranks DeepSpeed reduces (averages) gradients over."""
        return self.dp * self.cp // self.ep

    def describe(self) -> str:
        return describe(
            self.tp,
            self.pp,
            self.vpp,
            self.zero,
            sp=self.sp,
            ep=self.ep,
            cp=self.cp,
            dp=self.dp,
            micro_batch=self.micro_batch,
            microbatches=self.num_microbatches,
        )

    def saved(self) -> dict:
        """What a checkpoint's manifest records of the layout it was saved at."""
        return asdict(self)


def describe(
    tp: int,
    pp: int,
    vpp: Optional[int],
    zero: int,
    *,
    sp: bool = False,
    ep: int = 1,
    cp: int = 1,
    dp: Optional[int] = None,
    micro_batch: Optional[int] = None,
    microbatches: Optional[int] = None,
) -> str:
    """One line naming a layout the same way everywhere (log, checkpoint report, plan, bench):
    ``tp2+sp cp2 pp2 vpp2 dp4 ep2 zero1 mb4x8`` (cp, vpp, dp, ep and the batch left out where trivial or unknown)."""
    parts = [f"tp{tp}{'+sp' if sp else ''}"]
    if cp > 1:
        parts.append(f"cp{cp}")
    parts.append(f"pp{pp}")
    if vpp and vpp > 1:
        parts.append(f"vpp{vpp}")
    if dp is not None:
        parts.append(f"dp{dp}")
    if ep > 1:
        parts.append(f"ep{ep}")
    parts.append(f"zero{zero}")
    if micro_batch is not None:
        parts.append(f"mb{micro_batch}" + (f"x{microbatches}" if microbatches is not None else ""))
    return " ".join(parts)


def describe_saved(saved: dict) -> str:
    """``describe`` of the layout a checkpoint's manifest recorded (older ones lack sp, ep, cp and the batch)."""
    micro_batch = saved.get("micro_batch")
    microbatches = saved["global_batch"] // (micro_batch * saved["dp"]) if micro_batch else None
    return describe(
        saved["tp"],
        saved["pp"],
        saved["vpp"],
        saved["zero"],
        sp=saved.get("sp", False),
        ep=saved.get("ep", 1),
        cp=saved.get("cp", 1),
        dp=saved["dp"],
        micro_batch=micro_batch,
        microbatches=microbatches,
    )
