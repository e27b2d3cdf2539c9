"""The bundled suite runs from the command line against a named provider."""
pytest_plugins = ["pytester"]


def test_bundled_suite_runs_against_named_provider(pytester):
    result = pytester.runpytest_subprocess("--pyargs", "kernelplane.testing.suite", "-q", "-p", "no:cacheprovider",
                                           "--kernelplane-provider", "attention=reference",
                                           "--kernelplane-provider", "moe=reference",
                                           "--kernelplane-provider", "kv_quantizer=rtn",
                                           "--kernelplane-provider", "spec_proposer=none")
    result.assert_outcomes(passed=12 + 4 + 1 + 1)


def test_bundled_suite_skips_capabilities_without_provider(pytester):
    result = pytester.runpytest_subprocess("--pyargs", "kernelplane.testing.suite", "-q", "-p", "no:cacheprovider")
    outcomes = result.parseoutcomes()
    assert outcomes.get("skipped", 0) >= 4 and "passed" not in outcomes and "failed" not in outcomes
