"""``swapmoe.models``: the bundled checkpoints, their corpus, training and evaluation, and tiny model builders for tests."""
