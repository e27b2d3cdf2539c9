"""Registers the ``ngram`` speculative proposer with kernelplane."""
from __future__ import annotations

from kernelplane import Capability, Provider, Requirements, Verdict, hookimpl

from .options import NgramOptions
from .proposer import NgramProposer

PROVIDER_NAME = "ngram"
PRIORITY = 50  # above the core's "none" proposer (0)


def supports(request, hardware) -> Verdict:
    """Bad options refuse the request with the reason, so selection reports it."""
    try:
        opts = NgramOptions.from_request(request)
    except ValueError as exc:
        return Verdict.no(str(exc))
    return Verdict.yes(f"prompt lookup n={opts.min_n}..{opts.max_n}, k={opts.num_speculative_tokens}"
                       + ("" if opts.backoff else ", no back-off")
                       + (f", off above batch {opts.disable_by_batch_size}" if opts.disable_by_batch_size else ""))


@hookimpl
def kernelplane_spec_proposers():
    return [Provider(
        name=PROVIDER_NAME,
        capability=Capability.SPEC_PROPOSER,
        priority=PRIORITY,
        factory=lambda request, hardware: NgramProposer.from_request(request),
        requirements=Requirements(methods=["ngram"]),
        supports=supports,
        description="prompt-lookup n-gram drafts: incremental index, longest then most recent match, "
                    "per-request back-off on rejected drafts; CPU only, any device",
    )]
