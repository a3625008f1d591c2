"""Character corpora: the help() topics CPython ships, local text files, contiguous splits."""

from __future__ import annotations

import pytest
import torch

from deqdiff.data.text import CharCorpus, load_corpus, load_text, pydoc_topics_text


def test_pydoc_topics_corpus_is_deterministic_and_split_90_5_5():
    from pydoc_data.topics import topics

    text = pydoc_topics_text()
    assert text.startswith(topics[sorted(topics)[0]])
    assert len(text) == sum(len(v) for v in topics.values()) + 2 * (len(topics) - 1)
    a, b = load_corpus(), load_corpus()
    assert a.vocab == b.vocab == sorted(set(text))
    n = len(text)
    assert (a.train.numel(), a.valid.numel(), a.test.numel()) == (int(0.9 * n), int(0.95 * n) - int(0.9 * n),
                                                                 n - int(0.95 * n))
    assert a.decode(torch.cat([a.train, a.valid, a.test])) == text
    assert torch.equal(a.test, b.test)


def test_encode_decode_round_trip_and_unknown_character():
    c = CharCorpus.from_text("abracadabra" * 5, name="t")
    assert c.vocab == ["a", "b", "c", "d", "r"]
    assert c.decode(c.encode("cab")) == "cab"
    with pytest.raises(KeyError, match="'z'"):
        c.encode("z")


def test_windows_cover_every_target_once():
    c = CharCorpus.from_text("".join(chr(97 + i % 26) for i in range(400)), name="t")
    w = c.windows("train", 7)
    assert w.shape == ((c.train.numel() - 1) // 7, 8)
    assert torch.equal(w[:, 1:].reshape(-1), c.train[1: 1 + w.shape[0] * 7])  # each target once, in order
    assert torch.equal(w[1:, 0], w[:-1, -1])  # windows share their boundary character
    with pytest.raises(ValueError, match="shorter than one window"):
        c.windows("valid", 1000)


def test_local_file_and_bad_files(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("hello world, " * 20, encoding="utf-8")
    c = load_corpus(f)
    assert c.name == str(f) and c.vocab_size == len(set("hello world, "))
    (tmp_path / "bin").write_bytes(b"\xff\xfe\x00abc")
    with pytest.raises(ValueError, match="not UTF-8"):
        load_text(tmp_path / "bin")
    (tmp_path / "empty").write_text("")
    with pytest.raises(ValueError, match="empty"):
        load_text(tmp_path / "empty")
    with pytest.raises(FileNotFoundError):
        load_text(tmp_path / "missing")
    with pytest.raises(ValueError, match="too few"):
        CharCorpus.from_text("abc")
    with pytest.raises(ValueError, match="max_chars"):
        load_corpus(f, max_chars=0)
