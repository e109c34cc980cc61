"""Findings across ranks under torchrun: every rank's, merged, on every rank.

`gradflow train` runs the pre-flight and the live watch on every rank; GradFlowCallback runs its pre-flight on every
rank of a user's Trainer; `probe-backward` / `inspect` of a Trainer factory probe on every rank. These helpers
gather what each rank found (all ranks call them: they are collectives) so that rank 0's report holds every rank's
findings, and every rank takes the same decision from them (refuse, stop, raise), so that no rank is left waiting
in a collective. In one process each is a no-op. See docs/distributed.md, "Findings from every rank".
(The per-parameter gathering of `probe-backward --ddp|--fsdp` is gradflow.distributed's.)
"""

from __future__ import annotations

import atexit
import dataclasses

from gradflow.finding import finding_line
from gradflow.stdio import silence_stdout
from gradflow.world import finish, is_multi_process, train_world


def _ranks_text(ranks: list[int], world: int) -> str:
    return f"(on rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))} of {world})"


def merge_findings(per_rank: list[list]) -> tuple[list, list[dict]]:
    """Each rank's findings -> (one list, the findings that not every rank saw).

    One finding per (code, location, message), in the order rank 0 found them, then those only later ranks saw;
    the parameters it concerns are the union over ranks. A finding that only some ranks saw gets " (on rank 1 of
    2)" at the end of its message; the second list names them: {code, slug, severity, location, ranks}."""
    world = len(per_rank)
    order: list[tuple] = []
    seen: dict[tuple, tuple] = {}  # key -> (finding, ranks, params)
    for r, findings in enumerate(per_rank):
        for f in findings:
            key = (f.code, f.location, f.message)
            if key not in seen:
                order.append(key)
                seen[key] = (f, [], list(f.params or []))
            first, ranks, params = seen[key]
            if r not in ranks:
                ranks.append(r)
            params.extend(p for p in (f.params or []) if p not in params)
    merged, partial = [], []
    for key in order:
        first, ranks, params = seen[key]
        message = first.message if len(ranks) == world else f"{first.message} {_ranks_text(ranks, world)}"
        merged.append(dataclasses.replace(first, message=message, params=params))
        if len(ranks) < world:
            partial.append({"code": first.code, "slug": first.slug, "severity": first.severity,
                            "location": first.location, "ranks": ranks})
    return merged, partial


def gather_findings(findings: list, world: tuple[int, str] | None = None) -> tuple[list, list[dict]]:
    """Every rank's `findings` merged (merge_findings), the same on every rank. A collective when the process
    group is up with more than one process (every rank must call it); otherwise `findings` as they are."""
    import torch.distributed as dist

    if world is None:
        if not is_multi_process():
            return list(findings), []
        world = (dist.get_world_size(), str(dist.get_backend()))
    everyone: list = [None] * world[0]
    dist.all_gather_object(everyone, list(findings))
    return merge_findings(everyone)


def gather_preflight(report, device_type: str = "cpu") -> None:
    """Under torchrun: every rank's pre-flight findings, merged, become `report.findings` on every rank (so every
    rank refuses when any rank found an error), and `report.distributed` says how. One process: no-op."""
    world = train_world(device_type)
    if world is None:
        return

    merged, partial = gather_findings(report.findings, world)
    report.findings = merged
    if report.preflight is not None:
        report.preflight["errors_after"] = [finding_line(f) for f in merged if f.severity == "error"]
    report.distributed = {
        "world_size": world[0], "backend": world[1], "preflight_batch": "each rank its own slice of the data",
        "findings_on_some_ranks": [dict(p, phase="pre-flight") for p in partial],
    }


def gather_watch(report, findings: list) -> list:
    """The live watch's findings from every rank, merged (a collective under torchrun: every rank calls it after
    training); the ones not every rank saw are added to `report.distributed`. Returns the merged list."""
    merged, partial = gather_findings(findings)
    info = report.distributed
    if info is not None:
        info["findings_on_some_ranks"] = list(info.get("findings_on_some_ranks") or []) + \
            [dict(p, phase="training") for p in partial]
    return merged


def speak_for_ranks(report) -> None:
    """probe-backward / inspect when the user's code started the process group itself (a Trainer factory under
    torchrun, without --ddp/--fsdp): every rank probed its own first batch; the findings of all ranks are merged
    into the report (a collective: every rank calls it), and only rank 0 prints. One process: nothing happens."""
    import torch.distributed as dist

    if not is_multi_process():
        return
    world = (dist.get_world_size(), str(dist.get_backend()))
    merged, partial = gather_findings(report.findings, world)
    report.findings = merged
    report.distributed = {"world_size": world[0], "backend": world[1],
                          "batch": "each rank its own (the trainer's dataloader on that rank)",
                          "findings_on_some_ranks": [dict(p, phase="probe") for p in partial]}
    if dist.get_rank() != 0:
        silence_stdout()
    # the Trainer's process group is nobody's to close: left to interpreter teardown, gloo could abort rank 0
    # ("terminate called without an active exception", seen once in 4.57's suite)
    atexit.register(finish)
