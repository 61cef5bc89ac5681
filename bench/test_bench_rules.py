"""pytest-benchmark suite: every fedagg rule and its alternatives (fedagg.benchmark.CASES).

    FEDAGG_BENCH_N=64 FEDAGG_BENCH_D=1000000 python -m pytest bench
    python -m pytest bench --benchmark-disable        # agreement checks only

Each alternative's output is checked against fedagg's once, outside the timing.
"""

import warnings

import pytest

from fedagg import benchmark as fb


@pytest.mark.parametrize("case", fb.CASES, ids=[f"{c.rule}-{c.impl}" for c in fb.CASES])
def test_rule(benchmark, case, inputs, probe, reference, settings):
    mod = None
    if case.requires:
        mod, why = fb.optional(case.requires)
        if mod is None:
            pytest.skip(why)
    ref = reference(case.rule)
    benchmark.group = case.rule
    benchmark.extra_info.update(rule=case.rule, impl=case.impl, n=inputs.n, d=inputs.d, f=inputs.f)

    def call():
        with warnings.catch_warnings():  # third-party deprecation warnings
            warnings.simplefilter("ignore")
            return case.fn(inputs, mod)

    if case.impl != "fedagg":
        if probe is not None:
            estimate = fb.estimate_seconds(case, mod, probe, inputs.d)
            if estimate > settings["max_seconds"]:
                pytest.skip(f"{case.rule}/{case.impl}: ~{estimate:.3g} s per call estimated "
                            f"> FEDAGG_BENCH_MAX_SECONDS = {settings['max_seconds']:g}")
        agrees, note = fb.check(case.check, call(), ref, inputs, inputs.ctx[case.rule].selected)
        benchmark.extra_info.update(agrees=agrees, note=fb._join(case.note, note))
        if case.same_definition:
            assert agrees is not False, f"{case.rule}/{case.impl} disagrees with fedagg: {note}"

    benchmark.pedantic(call, rounds=settings["rounds"], iterations=1, warmup_rounds=1)
    if benchmark.stats is not None:  # None with --benchmark-disable
        median = benchmark.stats.stats.median
        benchmark.extra_info["gbps"] = inputs.X.nbytes / median / 1e9
