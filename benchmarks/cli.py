"""The command line of ``python -m benchmarks``: a header (machine, versions) and the sections.

The comparison of the cases comes first (unless ``--cases none``); every other section is
optional and listed once in ``SECTIONS``: its flag, title and the function that renders it.
A new table is a module with such a function and one entry there.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from . import cases as _cases
from .compare import cases_section
from .machine import describe_machine
from .table import heading

__all__ = ["main", "SECTIONS"]


def _log(message: str) -> None:
    """Progress goes to stderr, so that stdout is the report alone."""
    print(message, file=sys.stderr, flush=True)


# ---- optional sections ------------------------------------------------------------------------


def _scaling(args: argparse.Namespace) -> str:
    from .scaling import scaling_table

    return scaling_table(repeat=min(args.repeat, 3), markdown=args.markdown, quick=args.quick,
                         log=_log)


def _service(args: argparse.Namespace) -> str:
    from .service import bench_service, format_table

    sizes = (10_000,) if args.quick else (10_000, 1_000_000)
    return format_table(bench_service(overhead_sizes=sizes))


def _gpu(args: argparse.Namespace) -> str:
    from .roofline import gpu_report

    return gpu_report(repeat=min(args.repeat, 3), markdown=args.markdown,
                      budget=args.peer_budget, log=_log)


def _trust(args: argparse.Namespace) -> str:
    from .trust import trust_rows, trust_table

    return trust_table(trust_rows(("wave", "decay_x0", "float32") if args.quick else None),
                       markdown=args.markdown)


def _connectivity(args: argparse.Namespace) -> str:
    from .connectivity import connectivity_table

    return connectivity_table(repeat=min(args.repeat, 3), quick=args.quick,
                              markdown=args.markdown, threads=args.threads, log=_log)


def _layer(args: argparse.Namespace) -> str:
    from .layer import layer_report

    return layer_report(repeat=args.repeat, markdown=args.markdown, quick=args.quick,
                        budget=args.peer_budget, log=_log, memory_gib=args.peer_memory)


def _layer_stiff(args: argparse.Namespace) -> str:
    from .layer import stiff_report

    m = 8 if args.quick else (args.stiff_grid or 128)
    return stiff_report(m, 4 if args.quick else 64, args.peer_budget, args.peer_memory,
                        args.markdown, log=_log)


def _stiff(args: argparse.Namespace) -> str:
    from .stiff import StiffOptions, stiff_tables

    options = StiffOptions.quick() if args.quick else StiffOptions()
    options.peers = not args.no_peers
    options.dissipative = args.stiff_dissipative
    options.threads = args.threads
    for name in ("grid", "sizes", "budget", "mem_gib", "tables", "polynomial_rtols"):
        value = getattr(args, f"stiff_{name}")
        if value is not None:
            setattr(options, name, value)
    return stiff_tables(options, markdown=args.markdown, log=_log)


@dataclass(frozen=True)
class Section:
    """An optional part of the report: ``--flag`` turns it on; ``render(args)`` returns it."""

    flag: str
    title: str
    help: str
    render: Callable[[argparse.Namespace], str]


SECTIONS: tuple[Section, ...] = (
    Section("trust", "Trust: true error against rtol and against the estimate, per operator class",
            "also check accuracy on the operator gallery against the exact reference in ball "
            "arithmetic: worst error / rtol and error / estimate per class (~1-2 min)", _trust),
    Section("scaling", "Scaling of our time with n, S and k (sparse grid problems)",
            "also time ours against n, S and k on sparse grid problems", _scaling),
    Section("service", "Dask service: parameter-server overhead and speed-up",
            "also measure the Dask service: parameter-server overhead per step (n = 1e4, 1e6) "
            "and the speed-up of 2 workers over 1 (~2 min)", _service),
    Section("connectivity", "Connectivity weights: the forum's UDE at n = 100 and n = 1e4",
            "also time the gradient of 10^4 generator weights (n = 100) against matrix_exp and "
            "torchdiffeq, and of 5 x 10^4 weights on a 10^4-node graph (~1 min)",
            _connectivity),
    Section("layer", "PyTorch layer: the bridge's cost, and stiff diffusion against torch peers",
            "also time diagode_dist.torch against dd.loss_and_grad (seed demo shape) and "
            "against torchdiffeq and matrix_exp on stiff 2-D diffusion, one process per "
            "method (~5-10 min)", _layer),
    Section("layer-stiff", "PyTorch layer on stiff 2-D diffusion against torch peers",
            "also run the layer (rational Krylov) and torchdiffeq / matrix_exp on 2-D diffusion, "
            "128 x 128 grid (--stiff-grid), S = 64, ||tA|| = 5000: one process per method, "
            "each stopped after --peer-budget s or at --peer-memory GiB; errors against the "
            "exact spectral reference (~5 min plus the budget per peer)", _layer_stiff),
    Section("stiff", "Stiff problems: rational against polynomial Krylov and peers",
            "also time the rational (shift-and-invert) method on 2-D diffusion against the "
            "polynomial one and the peers (diffrax Kvaerno5, torchdiffeq), each in its own "
            "capped process, scored by expm_multiply: accuracy, time against ||TA|| and n "
            "(n = 4096 .. 262144; ~30-40 min on 2 idle cores)", _stiff),
    Section("gpu", "GPU: orthogonalisation bandwidth against the roofline",
            "also run ours on CuPy (n ~ 1e5, S = 1024) with the orthogonalisation's bytes "
            "moved, bandwidth and roofline fraction", _gpu),
)


# ---- the parser -------------------------------------------------------------------------------


def _case_list(text: str) -> list[str]:
    if text.strip() == "none":  # e.g. --gpu alone
        return []
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in _cases.CASE_NAMES]
    if not names or unknown:
        raise argparse.ArgumentTypeError(
            f"unknown case(s) {', '.join(unknown) or text!r}; choose from "
            f"{', '.join(_cases.CASE_NAMES)}")
    return names


def _positive(kind: type) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
        return value

    return parse


def _stiff_table_names(text: str) -> tuple[str, ...]:
    """"accuracy,flatness" -> the names, each one of STIFF_TABLES."""
    from .stiff import STIFF_TABLES

    names = tuple(part.strip() for part in text.split(",") if part.strip())
    if not names or any(name not in STIFF_TABLES for name in names):
        raise argparse.ArgumentTypeError(
            f"--stiff-tables: expected names among {', '.join(STIFF_TABLES)}, got {text!r}")
    return names


def _rtol_list(text: str) -> tuple[float, ...]:
    """"1e-8,1e-12" -> (1e-8, 1e-12); "none" -> () (no rows)."""
    if text.strip() == "none":
        return ()
    try:
        values = tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        values = ()
    if not values or not all(0 < value < 1 for value in values):
        raise argparse.ArgumentTypeError(
            f"--stiff-polynomial-rtols: expected rtols in (0, 1), comma-separated, or none, "
            f"got {text!r}")
    return values


def _square_sizes(text: str) -> tuple[int, ...]:
    """n values of 2-D grids ("4096,16384") -> their sides m (n = m^2)."""
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--stiff-sizes: expected comma-separated integers, got {text!r}") from None
    sides = [round(n**0.5) for n in sizes]
    if not sizes or any(n < 16 or m * m != n for n, m in zip(sizes, sides, strict=True)):
        raise argparse.ArgumentTypeError(
            f"--stiff-sizes: expected squares n = m^2 >= 16 (e.g. 4096,16384), got {text!r}")
    return tuple(sides)


def _stiff_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("stiff section (--stiff)")
    group.add_argument("--stiff-grid", type=_positive(int), default=None,
                       help="grid side m of the accuracy and ||TA|| tables and of "
                       "--layer-stiff, n = m^2 (default 128; with --quick 16, 8 for --layer-stiff)")
    group.add_argument("--stiff-sizes", type=_square_sizes, default=None,
                       help="n of the table against n (squares; default "
                       "4096,16384,65536,262144)")
    group.add_argument("--stiff-budget", type=_positive(float), default=None,
                       help="seconds each method (ours or a peer) may run after its set-up "
                       "before it is stopped (default 300; 60 with --quick)")
    group.add_argument("--stiff-mem-gib", type=_positive(float), default=None,
                       help="address-space cap of each method's process, GiB (default 12)")
    group.add_argument("--stiff-tables", type=_stiff_table_names, default=None,
                       help="which tables: accuracy (ours, the polynomial path and the peers "
                       "against the reference), flatness (time against ||TA||), scaling (time "
                       "and memory against n); comma-separated, default all")
    group.add_argument("--stiff-polynomial-rtols", type=_rtol_list, default=None,
                       help="rtols of the polynomial path's rows in the accuracy table "
                       "(default 1e-8,1e-12; none: no such rows)")
    group.add_argument("--stiff-dissipative", action="store_true",
                       help="also the dissipative variant (u in [0, 1], every eigenvalue < 0)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Time dd.loss_and_grad against its exact reference and its peers "
        "(torchdiffeq, dense matrix_exp, the seed's quadrature) on identical problems.")
    parser.add_argument("--quick", action="store_true",
                        help="tiny case, one run each (a smoke test of the harness)")
    parser.add_argument("--cases", type=_case_list, default=None,
                        help=f"comma-separated, from {','.join(_cases.CASE_NAMES)}, or none "
                        f"(default: {','.join(_cases.DEFAULT_CASES)})")
    parser.add_argument("--repeat", type=_positive(int), default=None,
                        help="timed runs per method (default 5; 1 with --quick)")
    parser.add_argument("--peer-budget", type=_positive(float), default=60.0,
                        help="seconds a method may take on a case before it is stopped or not "
                        "repeated (default: %(default)s)")
    parser.add_argument("--peer-memory", type=_positive(float), default=8.0,
                        help="GiB of data memory a method of --layer / --layer-stiff may use "
                        "(RLIMIT_DATA of its process; default: %(default)s)")
    parser.add_argument("--no-peers", action="store_true", help="skip the torch peers")
    parser.add_argument("--threads", type=_positive(int), default=2,
                        help="torch threads for the peers (default: %(default)s)")
    for section in SECTIONS:
        parser.add_argument(f"--{section.flag}", action="store_true", help=section.help)
    parser.add_argument("--markdown", action="store_true", help="print Markdown tables")
    _stiff_options(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark command line ``argv`` (default ``sys.argv[1:]``); returns 0."""
    args = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    names = args.cases
    if names is None:
        names = ["tiny"] if args.quick else list(_cases.DEFAULT_CASES)
    args.repeat = args.repeat or (1 if args.quick else 5)
    with_peers = not args.no_peers
    if with_peers:
        from . import peers

        if peers.available() is None:
            peers.configure_torch(args.threads)

    print(heading("diagode-dist benchmark", args.markdown))
    print(describe_machine(args.markdown, torch_threads=args.threads if with_peers else None))
    print()
    if names:
        print(cases_section(names, args.repeat, args.peer_budget, with_peers, args.markdown,
                            log=_log))
    for section in SECTIONS:
        if getattr(args, section.flag.replace("-", "_")):
            print()
            print(heading(section.title, args.markdown))
            print(section.render(args), flush=True)
    return 0
