"""The examples in the docstrings run and give the documented output."""

import doctest

import pytest

import fedagg
import fedagg.aggregator
import fedagg.compress
import fedagg.compress.bench
import fedagg.distributed.bench
import fedagg.privacy
import fedagg.privacy.bench
import fedagg.ledger.bench
import fedagg.lora.bench
import fedagg.secure.bench
import fedagg.server
import fedagg.transport.bench
import fedagg.rules


@pytest.mark.parametrize("module", [fedagg, fedagg.rules, fedagg.aggregator, fedagg.compress,
                                    fedagg.compress.bench, fedagg.privacy, fedagg.privacy.bench,
                                    fedagg.server, fedagg.transport.bench, fedagg.ledger.bench,
                                    fedagg.distributed.bench, fedagg.secure.bench, fedagg.lora.bench],
                         ids=lambda m: m.__name__)
def test_docstring_examples(module):
    result = doctest.testmod(module, verbose=False, report=True)
    assert result.attempted > 0, f"{module.__name__} has no docstring examples"
    assert result.failed == 0
