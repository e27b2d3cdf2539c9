"""pytest plugin (auto-loaded through the ``pytest11`` entry point): adds
``--kernelplane-provider CAPABILITY=NAME`` for the bundled suite."""


def pytest_addoption(parser):
    group = parser.getgroup("kernelplane")
    group.addoption("--kernelplane-provider", action="append", dest="kernelplane_provider", default=[],
                    metavar="CAPABILITY=NAME",
                    help="run kernelplane.testing.suite against this provider, e.g. attention=triton (repeatable)")
