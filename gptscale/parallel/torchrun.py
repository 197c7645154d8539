"""torchrun, whose rendezvous failures end in one line that says what to check (launch/torchrun.sh runs it).

torchrun reports an unreachable rendezvous or a node that never joined as a bare ``RendezvousTimeoutError``
traceback, and a signal it forwarded to the ranks as a ``SignalException`` traceback; everything else is torchrun.
"""

from __future__ import annotations

import sys

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.rendezvous.api import RendezvousConnectionError, RendezvousTimeoutError
from torch.distributed.run import main as torchrun
from torch.distributed.run import parse_args


def _rdzv_timeout(rdzv_conf: str) -> str:
    options = dict(item.split("=", 1) for item in rdzv_conf.split(",") if "=" in item)
    return options.get("join_timeout", "600")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    where = f"the rendezvous at {args.rdzv_endpoint} (id {args.rdzv_id}, {args.nnodes} nodes)"
    try:
        torchrun(argv)
    except RendezvousConnectionError as error:
        cause = str(error.__cause__ or error).splitlines()[0]
        sys.exit(f"gptscale: cannot reach {where}: {cause}\n"
                 "Is node 0 running, and is the master address node 0's address as this node sees it?")
    except RendezvousTimeoutError:
        sys.exit(f"gptscale: {where} timed out after {_rdzv_timeout(args.rdzv_conf)} s before every node joined.\n"
                 "Did every node start, with the same --nnodes, master address, port and rendezvous id?")
    except SignalException as error:
        print(f"gptscale: torchrun got {error.sigval.name} and passed it to the ranks (they save and stop)",
              file=sys.stderr)
        sys.exit(128 + int(error.sigval))


if __name__ == "__main__":
    main()
