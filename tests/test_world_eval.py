"""The base world, its probes, and the probe evaluator on models whose logits are set by hand."""

import math

import pytest
import torch
from torch import nn

from topocl.evaluate import probe_accuracy, score_probes
from topocl.tasks.base import Probe
from topocl.world import FACTS, RELATIONS, base_probes, statement, synthetic_corpus


def test_corpus_is_deterministic_and_states_facts():
    a, b = synthetic_corpus(50, seed=1), synthetic_corpus(50, seed=1)
    assert a == b and a != synthetic_corpus(50, seed=2)
    text = " ".join(synthetic_corpus(2000, seed=0))
    for s, r, v in FACTS:  # every fact appears in its canonical form somewhere
        assert statement(s, r, v)[:-1] in text, (s, r, v)


def test_base_probes_answers_among_candidates_and_values_in_relations():
    probes = base_probes()
    assert len(probes) == 2 * len(FACTS)
    for p in probes:
        assert p.answer in p.candidates and p.kind == "base"
        assert p.answer.strip() in RELATIONS[p.tags["relation"]].values
    assert {p.tags["paraphrase"] for p in probes} == {"seen", "unseen"}
    with pytest.raises(ValueError, match="not among candidates"):
        Probe("x", " a", [" b"])


class Table(nn.Module):
    """A 'model' whose next-token logits depend only on the current token: logits[t] = W[idx[t]]."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(vocab, vocab))

    def forward(self, idx):
        return type("Out", (), {"logits": self.w[idx]})()


class CharTok:
    """One token per character ('a' = 1, ...), BOS 0."""

    bos_id = 0

    def encode(self, s: str) -> list[int]:
        return [ord(c) - 96 if c != " " else 27 for c in s]


def test_evaluator_exact_on_hand_set_logits():
    m = Table(28)
    with torch.no_grad():
        m.w[2, 27] = 5.0  # after "b", a space is very likely
        m.w[27, 3] = math.log(3.0)  # after space: "c" has 3x the mass of the other 27 tokens
    probes = [Probe("ab", " c", [" c", " d"], id="p1"), Probe("ab", " d", [" c", " d"], kind="update", id="p2")]
    s1, s2 = score_probes(m, CharTok(), probes, device="cpu")
    lp_space = 5.0 - math.log(math.exp(5.0) + 27)
    lp_c = math.log(3.0) - math.log(3.0 + 27)
    lp_d = -math.log(3.0 + 27)
    assert s1.correct and not s2.correct and s1.best == s2.best == " c"
    assert s1.nll == pytest.approx(-(lp_space + lp_c), abs=1e-5)
    assert s2.nll == pytest.approx(-(lp_space + lp_d), abs=1e-5)
    assert s1.em and not s2.em  # greedy after "ab" emits " c"
    acc = probe_accuracy([s1, s2])
    assert acc["retain"]["acc"] == 1.0 and acc["update"]["acc"] == 0.0 and acc["update"]["n"] == 1


def test_ties_are_not_counted_correct():
    m = Table(28)  # all-zero logits: every candidate ties
    (s,) = score_probes(m, CharTok(), [Probe("a", " b", [" b", " c"])], device="cpu")
    assert not s.correct


def test_evaluator_serves_a_hugging_face_model():
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer as HFTok
    from tokenizers import models, pre_tokenizers

    vocab = {"<s>": 0, "Fire": 1, "Ġfeels": 2, "Ġhot": 3, "Ġcold": 4, "Ġ": 5}
    core = HFTok(models.WordLevel(vocab, unk_token="<s>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>")
    cfg = transformers.LlamaConfig(vocab_size=6, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    probes = [Probe("Fire feels", " hot", [" hot", " cold"])]
    (s,) = score_probes(model, hf_tok, probes, device="cpu")
    ids = torch.tensor([[0, 1, 2, 3]])
    with torch.no_grad():
        ref = torch.log_softmax(model(ids).logits[0, 2].float(), -1)[3]
    assert s.nll == pytest.approx(-float(ref), abs=1e-5)
