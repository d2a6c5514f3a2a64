"""``bayesmanifold checkpoints``: list the wind-tunnel checkpoints shipped with the package."""

import json

from ..io import atomic_write_json
from .common import add_json_arg

NAME = "checkpoints"
HELP = ("list the shipped wind-tunnel checkpoints (name, task, arch, params, steps of the last "
        "stage with all stages in parentheses, recorded MAE)")
EXAMPLE = "bayesmanifold checkpoints --json checkpoints.json"


def add_arguments(parser) -> None:
    add_json_arg(parser, help="write the list as JSON to PATH")


def run(args) -> int:
    from ..models.checkpoint import list_shipped

    rows = list_shipped()
    if args.json:
        atomic_write_json(args.json, {"checkpoints": rows})
    if not rows:
        print("no shipped checkpoints found")
        return 0
    head = f"{'name':<28} {'task':<10} {'task params':<30} {'arch':<12} {'n_params':>9} {'steps':>13} {'MAE (bits)':>11}"
    print(head)
    print("-" * len(head))
    for r in rows:
        mae = "-" if r["entropy_mae_bits"] is None else f"{r['entropy_mae_bits']:.4f}"
        params = json.dumps(r["task_params"], separators=(",", "=")).strip("{}").replace('"', "")
        steps = str(r["steps"] or 0)
        if r["total_steps"] != (r["steps"] or 0):
            steps += f" ({r['total_steps']})"
        print(f"{r['name']:<28} {r['task'] or '-':<10} {params:<30} {r['arch'] or '-':<12} "
              f"{r['n_params'] or 0:>9} {steps:>13} {mae:>11}")
    return 0
