"""Time of one training step at the paper's bijection shape, and the operations a GPU would launch.

The paper's bijection model (preset ``bijection-paper``: 6 layers × 6 heads, d_model 192) at its
batch of 128 sequences of 38 tokens: seconds per optimiser step (forward, backward, clipping,
AdamW) from :func:`bayesmanifold.experiments.paper_size.measure_step_time`, and, from one profiled
step with the PyTorch profiler, the number of leaf ``aten`` operations that are not views or
allocations (each one kernel launch on a GPU), which bounds an accelerator's step time when the
arithmetic is small (this shape: 6 × parameters × tokens ≈ 7.9e10 FLOPs per step).

Usage::

    python benchmarks/paper_step.py [--threads 1] [--steps 5] [--device cpu] [--json PATH]
"""

import argparse
import json

import torch

VIEWS = {"aten::view", "aten::as_strided", "aten::reshape", "aten::expand", "aten::permute", "aten::transpose",
         "aten::t", "aten::unsqueeze", "aten::squeeze", "aten::slice", "aten::select", "aten::_unsafe_view",
         "aten::detach", "aten::alias", "aten::empty", "aten::empty_strided", "aten::resolve_conj",
         "aten::resolve_neg", "aten::lift_fresh", "aten::result_type", "aten::is_nonzero", "aten::item",
         "aten::_local_scalar_dense", "aten::split", "aten::unbind", "aten::chunk", "aten::empty_like",
         "aten::size", "aten::stride"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from torch.profiler import ProfilerActivity, profile

    from bayesmanifold.experiments.paper_size import measure_step_time
    from bayesmanifold.models.presets import build_model, count_params, preset_spec
    from bayesmanifold.models.training import batch_loss
    from bayesmanifold.windtunnels.registry import task_from_dict

    task = task_from_dict({"task": "bijection"})
    spec = preset_spec("bijection-paper", task)
    step_s = measure_step_time(task, spec, 128, device=args.device, n_steps=args.steps, warmup_steps=2)
    model = build_model(spec, device=args.device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    batch = task.sample(128, 0).to(args.device)

    def step() -> None:
        loss = batch_loss(model, batch, "hard")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    leaf = [e for e in prof.events() if e.name.startswith("aten::") and not any(c.name.startswith("aten::") for c in e.cpu_children)]
    kernels = sum(e.name not in VIEWS for e in leaf)
    params = count_params(model)
    out = {"params": params, "batch": 128, "seq_len": task.seq_len, "threads": args.threads, "device": args.device,
           "step_s": step_s, "leaf_ops": len(leaf), "kernel_ops": kernels,
           "flops_per_step": 6 * params * 128 * task.seq_len}
    print(json.dumps(out, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
