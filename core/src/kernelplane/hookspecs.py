"""The hooks a kernelplane plugin implements. These docstrings are the plugin
author's reference.

A plugin is a module (or object) with functions decorated ``@hookimpl`` and
registered under the entry-point group ``kernelplane.plugins``::

    # pyproject.toml
    [project.entry-points."kernelplane.plugins"]
    my_attention = "my_package.plugin"

    # my_package/plugin.py
    from kernelplane import hookimpl, Provider, Capability, Requirements

    @hookimpl
    def kernelplane_attention_backends():
        return [Provider(name="mine", capability=Capability.ATTENTION, priority=50,
                         factory=lambda request, hardware: MyBackend(request),
                         requirements=Requirements(device_types=["cuda"]))]

Implement only the hooks you need. Each capability hook returns a list of
``Provider`` descriptors; the factory of the one selected builds an object
satisfying the matching protocol in ``kernelplane.interfaces``.
"""
from __future__ import annotations

import pluggy

PROJECT = "kernelplane"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def kernelplane_attention_backends():
    """Return a list of ``Provider`` with ``capability=Capability.ATTENTION``.

    The factory receives an ``AttentionRequest`` and the ``Hardware`` and
    returns an ``interfaces.AttentionBackend``.
    """


@hookspec
def kernelplane_kv_quantizers():
    """Return a list of ``Provider`` with ``capability=Capability.KV_QUANTIZER``.

    The factory receives a ``KVQuantRequest`` and returns an
    ``interfaces.KVQuantizer`` for ``request.format``.
    """


@hookspec
def kernelplane_moe_kernels():
    """Return a list of ``Provider`` with ``capability=Capability.MOE``.

    The factory receives a ``MoERequest`` and returns an ``interfaces.MoEKernel``.
    """


@hookspec
def kernelplane_spec_proposers():
    """Return a list of ``Provider`` with ``capability=Capability.SPEC_PROPOSER``.

    The factory receives a ``SpecRequest`` and returns an
    ``interfaces.SpeculativeProposer``.
    """


@hookspec
def kernelplane_hardware_facts(hardware):
    """Return a dict of extra facts about this machine (or None).

    Called once per probe with the core's ``Hardware``; the dicts of all
    plugins are merged into ``Hardware.extra``, which providers may read in
    their ``supports``.
    """
