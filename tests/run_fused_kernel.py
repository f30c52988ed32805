"""Child process of tests/test_zipf_fused.py: runs the fused Zipf kernel in Triton's interpreter.

Usage: TRITON_INTERPRET=1 python tests/run_fused_kernel.py CASES.pt RESULTS.pt
Reads the cases the test wrote (logits, targets, votes, alpha, distribution), writes the kernel's
loss and logits gradient per case, the method-level comparison (kernel=triton vs kernel=torch on a
small model's training step, eager and under torch.compile) and torch.library.opcheck's verdict
on the custom op. The expectations live in the test, not here."""

from __future__ import annotations

import os
import sys

import torch

from zipfls_train.data.batch import Batch
from zipfls_train.losses.zipf import ZipfLabelSmoothing
from zipfls_train.losses import dense_logits, zipf_fused
from zipfls_train.losses.zipf_fused import DenseMap, fused_ce_zipf, fused_zipf_kl
from zipfls_train.models import build_model


COMBINED_WEIGHT = 0.7  # lambda of the fused CE + Zipf case
DEFAULT_MAX_DENSE_LOGITS = dense_logits.MAX_DENSE_LOGITS


def run_case(case: dict) -> dict:
    """The KL alone (fused_zipf_kl) and CE + 0.7 KL (fused_ce_zipf): values and logits gradients."""
    out = {}
    votes = case["votes"]
    if "dense" in case:  # the kernel casts the votes itself, from the map and the classifier
        dense = case["dense"]
        votes = DenseMap(dense["feature_map"], dense["weight"], dense["bias"], dense["upsample"])
        dense_logits.MAX_DENSE_LOGITS = dense.get("max_dense_logits", DEFAULT_MAX_DENSE_LOGITS)
    for variant in ("kl", "combined"):
        logits = case["logits"].clone().requires_grad_()
        used = logits[:, : case["num_classes"]]  # a row stride wider than C where the case says so
        args = (used, case["targets"], votes)
        if variant == "kl":
            loss = fused_zipf_kl(*args, case["alpha"], case["distribution"])
            values = {"loss": loss.item()}
        else:
            loss, ce, kl = fused_ce_zipf(*args, COMBINED_WEIGHT, case["alpha"], case["distribution"])
            values = {"loss": loss.item(), "ce": ce.item(), "kl": kl.item(), "terms_require_grad": ce.requires_grad or kl.requires_grad}
        loss.backward()
        out[variant] = {**values, "grad": logits.grad[:, : case["num_classes"]].clone(), "grad_dtype": str(logits.grad.dtype)}
    return out


def method_step(kernel: str, compiled: bool = False, stages: tuple[str, ...] = ("final",)) -> dict:
    """One training step's loss terms and parameter gradients for a tiny CIFAR ResNet-18, and how
    many times the kernel was launched in it (torch.compile: the model's forward and the loss as one
    graph, as trainer.compile does; fullgraph, so a graph break fails). ``stages`` = (final,
    penultimate): Dense2, 320 votes per sample, with the penultimate stage's auxiliary head."""
    torch.manual_seed(0)
    method = ZipfLabelSmoothing(10, weight=0.7, upsample="bilinear", kernel=kernel, stages=stages)
    model = build_model("cifar_resnet18", num_classes=10, width=8, aux_stages=method.needs.aux_stages)
    batch = Batch(inputs=torch.randn(6, 3, 32, 32), targets=torch.tensor([0, 3, 3, 9, 1, 5]), indices=torch.arange(6))
    step = torch.compile(method.training_step, fullgraph=True) if compiled else method.training_step
    launches = []
    run_kernel = zipf_fused._run_kernel
    zipf_fused._run_kernel = lambda *args: launches.append(1) or run_kernel(*args)
    try:
        terms = step(model, batch)
    finally:
        zipf_fused._run_kernel = run_kernel
    terms["loss"].backward()
    return {
        "terms": {name: value.item() for name, value in terms.items()},
        "grads": {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None},
        "kernel_launches": len(launches),
    }


def opcheck(cases: dict) -> dict:
    """torch.library.opcheck of zipfls_train::ce_zipf (schema, fake tensor, autograd registration,
    torch.compile) on given votes and on upsampled dense logits: "ok" or the failure."""
    verdicts = {}
    for name in ("worked_example", "dense_4x4_up_c10"):
        case = cases[name]
        votes = case["votes"]
        if "dense" in case:
            dense = case["dense"]
            votes = DenseMap(dense["feature_map"], dense["weight"], dense["bias"], dense["upsample"])
        source = zipf_fused._vote_source(votes)
        args = (case["logits"].clone().requires_grad_(), case["targets"], *source, 1.0, "zipf", 0.7, True, False)
        try:
            torch.library.opcheck(torch.ops.zipfls_train.ce_zipf.default, args)
            verdicts[name] = "ok"
        except Exception as error:  # noqa: BLE001 - reported to the test
            verdicts[name] = f"{type(error).__name__}: {error}"
    return verdicts


def main(cases_path: str, results_path: str) -> None:
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
    cases = torch.load(cases_path)
    # The cases test the kernel itself, each against its float64 reference (a wrong kernel would
    # otherwise stop at its first call's check); the check runs below, on the method's first step.
    zipf_fused._kernel_state["cpu"] = "checked"
    results = {name: run_case(case) for name, case in cases.items()}
    dense_logits.MAX_DENSE_LOGITS = DEFAULT_MAX_DENSE_LOGITS
    zipf_fused._kernel_state.clear()
    first = method_step("triton")  # the first call also compares the kernel with the reference
    results["first_call"] = {"kernel_launches": first["kernel_launches"], "kernel_state": dict(zipf_fused._kernel_state)}
    dense2 = ("final", "penultimate")
    results["method"] = {"triton": method_step("triton"), "torch": method_step("torch"), "compiled": method_step("triton", compiled=True)}
    results["dense2"] = {"triton": method_step("triton", stages=dense2), "torch": method_step("torch", stages=dense2)}
    results["opcheck"] = opcheck(cases)
    torch.save(results, results_path)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
