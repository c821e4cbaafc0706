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
    ("1PiB", 2**50),
])
def test_parse_size_accepts_what_users_write(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text, expected", [
    ("512Mi", 512 * 2**20),
    ("2Gi", 2 * 2**30),
    ("64Ki", 64 * 1024),
    ("1Ti", 2**40),
    ("1.5Gi", 3 * 2**29),
    ("800M", 800_000_000),
    ("2G", 2_000_000_000),
    ("128k", 128_000),
    ("1T", 10**12),
])
def test_parse_size_accepts_kubernetes_quantities_binary_with_i_and_decimal_without(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "GiB", "12XB", "-5MiB", "1.2.3GB", "ten MiB", "2Gio", "1Ei"])
def test_parse_size_rejects_malformed_text_listing_the_accepted_spellings(text):
    with pytest.raises(ValueError) as error:
        parse_size(text)
    assert str(error.value) == (
        f"malformed size {text!r}: expected a number of bytes with an optional unit: kB, MB, GB, TB, PB or "
        "k, M, G, T, P (powers of 1000); KiB, MiB, GiB, TiB, PiB or Ki, Mi, Gi, Ti, Pi (powers of 1024); "
        "e.g. 512MiB, 2Gi, 1.5GB")


@pytest.mark.parametrize("text", ["0", "0.4", "0 MiB"])
def test_parse_size_rejects_sizes_under_one_byte(text):
    with pytest.raises(ValueError) as error:
        parse_size(text)
    assert str(error.value) == f"size {text!r} must be at least one byte"


def test_format_size_uses_iec_units():
    assert format_size(512) == "512 B"
    assert format_size(3 * 2**20 // 2) == "1.5 MiB"
    assert format_size(5 * 2**30) == "5.0 GiB"
