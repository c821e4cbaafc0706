"""The summarization task's data and its reference scorers."""

import numpy as np

from swapmoe.models.corpus import Document, SummaryPair, function_pairs
from swapmoe.models.evaluate import paired_bootstrap, retrieval_summaries

SOURCE = '''
def blank(x):
    """   """
    return x


def read_config(path):
    """Read the configuration file at path.

    More detail.
    """
    with open(path) as f:
        return f.read()
'''


def test_a_function_pair_is_its_code_without_docstring_and_the_docstrings_first_line():
    pairs = list(function_pairs(Document("code", "example.py", "PSF-2.0", SOURCE)))
    assert [p.name for p in pairs] == ["read_config"]  # a blank docstring gives no pair (and no error)
    assert pairs[0].summary == "Read the configuration file at path."
    assert pairs[0].body.startswith("def read_config(path):") and "More detail" not in pairs[0].body


def test_retrieval_returns_the_summary_of_the_training_function_with_the_most_similar_code():
    train = [SummaryPair("a", "read_config", "def read_config(path): return open(path).read()", "Read a config."),
             SummaryPair("b", "add_numbers", "def add_numbers(a, b): return a + b", "Add two numbers.")]
    assert retrieval_summaries(train, ["def add(numbers): return sum(numbers)",
                                       "def load_config(config_path): return open(config_path)"]) == [
        "Add two numbers.", "Read a config."]


def test_the_bootstrap_interval_of_a_paired_gap_holds_the_gap_and_excludes_zero_when_one_side_always_wins():
    rng = np.random.default_rng(0)
    theirs = rng.random(300) * 0.1
    low, high = paired_bootstrap(theirs + 0.05 + rng.normal(0, 0.01, 300), theirs)
    assert 0 < low < 0.05 < high
    low, high = paired_bootstrap(theirs, theirs[::-1].copy())
    assert low < 0 < high
