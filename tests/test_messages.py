"""The fixed-layout records and text rows ranks exchange besides models (fedmpi.messages)."""

from __future__ import annotations

import numpy as np
import pytest

from fedmpi.messages import PREFLIGHT, REPORT, record, records, row_text, text_row, width


def test_a_records_width_is_its_number_of_fields():
    """The server sizes its receive rows by width(): one float64 per field, no more."""
    assert width(REPORT) == len(REPORT.names) == 7 and width(PREFLIGHT) == 5
    rec = record(PREFLIGHT, samples=6, mean_age=61.5, x=16, y=20, z=16)
    assert rec.dtype == np.float64 and rec.tolist() == [6, 61.5, 16, 20, 16]


def test_a_record_needs_every_field():
    """A field left out would travel as a silent zero."""
    with pytest.raises(ValueError, match="exactly the fields"):
        record(PREFLIGHT, samples=6, mean_age=61.5, x=16, y=20)
    with pytest.raises(ValueError, match="exactly the fields"):
        record(PREFLIGHT, samples=6, mean_age=61.5, x=16, y=20, z=16, w=1)


def test_records_read_rows_of_any_numeric_type_as_values():
    """Rows given as integers are converted, not reinterpreted bit for bit."""
    got = records(np.array([[6, 60, 16, 20, 16], [7, 70, 16, 20, 16]], np.int64), PREFLIGHT)
    assert got["samples"].tolist() == [6.0, 7.0] and got["mean_age"].tolist() == [60.0, 70.0]


def test_text_rows_round_trip_and_fill_their_whole_width():
    assert row_text(text_row("host-1", 16)) == "host-1"
    assert row_text(text_row("abcd", 4)) == "abcd"  # exactly the width: nothing cut
    assert row_text(text_row("abcdef", 4)) == "abcd"
    assert row_text(text_row("ends with a space ", 32)) == "ends with a space "


def test_a_message_cut_inside_a_character_still_reads():
    """text_row cuts bytes, not characters: a rank's error message in UTF-8 may lose half a character at the
    end, which must not turn into a decoding error on the server."""
    row = text_row("volume für learner 2", 9)  # "ü" takes bytes 9 and 10: the cut keeps one
    assert row_text(row).startswith("volume f")


def test_control_characters_from_another_rank_are_escaped_not_passed_to_the_terminal():
    """A host name or error message from another rank is printed as received: escape sequences in it drove the
    terminal (here: clear the screen, set the window title, go back over the line; a C1 CSI, a NUL inside)."""
    sent = "host\x1b[2J\x1b]0;owned\x07\r\nnext\x9b31m\x00end"
    assert row_text(text_row(sent, 64)) == r"host\x1b[2J\x1b]0;owned\x07\r\nnext\x9b31m\x00end"
    assert row_text(text_row("volume für learner 2\tà", 64)) == r"volume für learner 2\tà"  # only controls change


def test_format_characters_from_another_rank_are_escaped_so_text_cannot_display_reversed_or_hide():
    """Bidirectional overrides and isolates (U+202E, U+2066) and zero-width characters (U+200B, U+2060, U+FEFF) are
    no controls (category Cf, not Cc): a host name or message holding them printed reversed or with hidden text
    ("Trojan source"). They are escaped as controls are."""
    sent = "node\u202e7-tsoh\u202c\u2066x\u2069\u200bhidden\u2060\ufeff\u00ad"
    assert row_text(text_row(sent, 64)) == r"node\u202e7-tsoh\u202c\u2066x\u2069\u200bhidden\u2060\ufeff\xad"


def test_line_and_paragraph_separators_from_another_rank_are_escaped():
    """U+2028 and U+2029 (categories Zl, Zp) are neither controls nor format characters, yet some terminals and log
    viewers start a new line at them: a message could forge a line of its own below the one that names its rank."""
    sent = "disk full\u2028rank 0: all learners finished\u2029"
    assert row_text(text_row(sent, 96)) == r"disk full\u2028rank 0: all learners finished\u2029"


@pytest.mark.parametrize("host", ["узел-3", "計算ノード7", "عقدة-٣", "κόμβος", "नोड-2", "node-ß"])
def test_letters_of_any_script_read_back_unchanged(host):
    """Only controls and format characters are escaped: a host name in another script (Arabic too, written right
    to left by its letters, not by an override) round-trips as it was sent."""
    assert row_text(text_row(host, 64)) == host
