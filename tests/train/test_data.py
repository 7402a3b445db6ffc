"""JSONL data: SFT scores the response (and its EOS) only, text scores every real token, padding is
never scored; the stream restarts exactly from its state_dict; bad lines name the line."""
import json

import pytest
import torch

from llmkern.train.data import ByteTokenizer, JsonlData


def write(tmp_path, rows):
    p = tmp_path / "d.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(p)


def test_sft_scores_the_response_only(tmp_path):
    path = write(tmp_path, [{"prompt": "ab", "response": "xyz"}] * 3 + [{"text": "hello"}] * 3)
    d = JsonlData(path, "byte", seq_len=12, eval_fraction=0.2, seed=0, replica=0)
    tok = ByteTokenizer()
    rows = torch.cat([d.tokens, d._eval[0]]), torch.cat([d.labels, d._eval[1]])
    sft = [i for i in range(6) if rows[0][i, 1] == ord("a")]
    text = [i for i in range(6) if rows[0][i, 1] == ord("h")]
    assert len(sft) == 3 and len(text) == 3
    tokens, labels = rows[0][sft[0]], rows[1][sft[0]]
    assert tokens.tolist()[:7] == [tok.bos_token_id, *b"abxyz", tok.eos_token_id]
    assert labels.tolist() == [-100, -100, -100, *b"xyz", tok.eos_token_id] + [-100] * 5
    tokens, labels = rows[0][text[0]], rows[1][text[0]]
    assert labels.tolist() == [-100, *b"hello", tok.eos_token_id] + [-100] * 5
    assert (tokens[7:] == tok.pad_token_id).all()


def test_truncation_and_resume_of_the_stream(tmp_path):
    path = write(tmp_path, [{"text": "x" * (i + 1)} for i in range(20)])
    d = JsonlData(path, "byte", seq_len=8, eval_fraction=0.1, seed=1, replica=0)
    assert d.tokens.shape == (18, 8) and d._eval[0].shape == (2, 8)
    d.batch(4)
    state = d.state_dict()
    a = d.batch(4)
    d.load_state_dict(state)
    b = d.batch(4)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    other = JsonlData(path, "byte", seq_len=8, eval_fraction=0.1, seed=1, replica=1)
    assert not torch.equal(other.batch(4)[0], JsonlData(path, "byte", 8, 0.1, 1, 0).batch(4)[0])


@pytest.mark.parametrize("line, match", [('{"prompt": "a"}', "line 2"), ("not json", "line 2 is not JSON"),
                                         ('["a"]', "line 2")])
def test_bad_lines_name_the_line(tmp_path, line, match):
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "ok"}\n' + line + "\n")
    with pytest.raises(ValueError, match=match):
        JsonlData(str(p), "byte", 8, 0.5, 0, 0)
