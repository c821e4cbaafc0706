"""Sizes as users write them on the command line."""

import pytest

from swapmoe.core.sizes import format_size, parse_size


@pytest.mark.parametrize("text, expected", [
    ("512MiB", 512 * 2**20),
    ("2GiB", 2 * 2**30),
    ("1.5GB", 1_500_000_000),
    ("1048576", 1048576),
    ("64 kib", 64 * 1024),
    ("3mb", 3_000_000),
])
def test_parse_size_accepts_what_users_write(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "GiB", "12XB", "-5MiB", "1.2.3GB", "ten MiB"])
def test_parse_size_rejects_malformed_text_with_the_accepted_forms(text):
    with pytest.raises(ValueError) as error:
        parse_size(text)
    assert str(error.value) == (f"malformed size {text!r}: expected a number with an optional unit "
                                "B, kB, MB, GB, TB, KiB, MiB, GiB or TiB (e.g. 512MiB, 2GiB, 1.5GB)")


@pytest.mark.parametrize("text", ["0", "0.4", "0 MiB"])
def test_parse_size_rejects_sizes_under_one_byte(text):
    with pytest.raises(ValueError) as error:
        parse_size(text)
    assert str(error.value) == f"size {text!r} must be at least one byte"


def test_format_size_uses_iec_units():
    assert format_size(512) == "512 B"
    assert format_size(3 * 2**20 // 2) == "1.5 MiB"
    assert format_size(5 * 2**30) == "5.0 GiB"
