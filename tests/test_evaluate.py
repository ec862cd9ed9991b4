"""The probe evaluator and perplexity on models whose logits are set by hand, a real GPT, and a Hugging Face
causal LM with its own tokenizer (built in-process, nothing downloaded)."""

import math

import pytest
import torch
from torch import nn

from topocl.config import ModelConfig
from topocl.evaluate import HFTokenizer, perplexity, probe_accuracy, score_probes
from topocl.model import GPT
from topocl.tasks.base import Probe


class Table(nn.Module):
    """A 'model' whose next-token logits depend only on the current token: logits[t] = W[idx[t]]."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(vocab, vocab))

    def forward(self, idx):
        return type("Out", (), {"logits": self.w[idx]})()


class CharTok:
    """One token per character ('a' = 1, ..., 'z' = 26, ' ' = 27), BOS 0."""

    bos_id = 0

    def encode(self, s: str) -> list[int]:
        return [ord(c) - 96 if c != " " else 27 for c in s]


def test_evaluator_exact_on_hand_set_logits():
    m = Table(28)
    with torch.no_grad():
        m.w[2, 27] = 5.0  # after "b", a space is very likely
        m.w[27, 3] = math.log(3.0)  # after space: "c" has 3x the mass of each of the other 27 tokens
    probes = [Probe("ab", " c", [" c", " d"], id="p1"), Probe("ab", " d", [" c", " d"], kind="update", id="p2")]
    s1, s2 = score_probes(m, CharTok(), probes, device="cpu")
    lp_space = 5.0 - math.log(math.exp(5.0) + 27)
    lp_c = math.log(3.0) - math.log(3.0 + 27)
    lp_d = -math.log(3.0 + 27)
    assert s1.correct and not s2.correct and s1.best == s2.best == " c"
    assert s1.nll == pytest.approx(-(lp_space + lp_c), abs=1e-5)
    assert s2.nll == pytest.approx(-(lp_space + lp_d), abs=1e-5)
    assert s1.margin == pytest.approx((lp_c - lp_d) / 2, abs=1e-5)  # per-token means of 2-token candidates
    assert s2.margin == pytest.approx((lp_d - lp_c) / 2, abs=1e-5) and s1.margin_sum == pytest.approx(lp_c - lp_d)
    assert s1.em and not s2.em and s1.n_answer_tokens == 2  # greedy after "ab" emits " c"
    acc = probe_accuracy([s1, s2])
    assert acc["retain"] == {"acc": 1.0, "acc_sum": 1.0, "em": 1.0, "nll": pytest.approx(s1.nll), "n": 1}
    assert acc["update"]["acc"] == 0.0 and acc["update"]["em"] == 0.0
    # exact_match=False skips the greedy check only
    f1, f2 = score_probes(m, CharTok(), probes, device="cpu", exact_match=False)
    assert (f1.correct, f2.correct, f1.em, f2.em) == (True, False, False, False) and f1.nll == s1.nll


def test_candidates_are_ranked_by_mean_log_likelihood_per_token_and_the_sum_is_kept():
    """Hand-set logits where the two rules disagree: the 2-token " c" has the larger summed log-likelihood, the
    3-token " dd" the larger mean per token; acc follows the mean, acc_sum the sum (which favours short answers)."""
    m = Table(28)
    with torch.no_grad():
        m.w[2, 27] = 10.0  # "b" -> " " almost surely
        m.w[27, 3], m.w[27, 4] = 1.0, 0.5  # after " ": "c" a little likelier than "d"
        m.w[4, 4] = 8.0  # "d" -> "d" almost surely
    lp = torch.log_softmax(m.w.detach(), -1)
    lp_c = float(lp[2, 27] + lp[27, 3])  # log p(" c" | "ab")
    lp_dd = float(lp[2, 27] + lp[27, 4] + lp[4, 4])  # log p(" dd" | "ab")
    assert lp_c > lp_dd and lp_c / 2 < lp_dd / 3  # the premise: sum and mean disagree
    short, long = score_probes(m, CharTok(), [Probe("ab", " c", [" c", " dd"], id="short"),
                                              Probe("ab", " dd", [" c", " dd"], id="long")], device="cpu")
    assert (short.correct, short.correct_sum, long.correct, long.correct_sum) == (False, True, True, False)
    assert long.best == short.best == " dd" and long.n_answer_tokens == 3 and short.n_answer_tokens == 2
    assert long.margin == pytest.approx(lp_dd / 3 - lp_c / 2, abs=1e-5)
    assert short.margin_sum == pytest.approx(lp_c - lp_dd, abs=1e-5) and long.margin_sum == -short.margin_sum
    assert long.nll == pytest.approx(-lp_dd, abs=1e-5) and long.answer_logprob == pytest.approx(lp_dd, abs=1e-5)
    acc = probe_accuracy([short, long], key=lambda s: "all")["all"]
    assert (acc["acc"], acc["acc_sum"]) == (0.5, 0.5)
    acc = probe_accuracy([long], key=lambda s: "long")["long"]
    assert (acc["acc"], acc["acc_sum"]) == (1.0, 0.0)


def test_exact_match_needs_every_answer_token_greedy():
    m = Table(28)
    with torch.no_grad():
        m.w[2, 27] = 5.0  # "b" -> " "
        m.w[27, 3] = 5.0  # " " -> "c"
        m.w[3, 4], m.w[3, 5] = 2.0, 3.0  # "c" -> "e" is greedy, "d" second
    (s,) = score_probes(m, CharTok(), [Probe("ab", " cd", [" cd", " xx"])], device="cpu")
    assert s.correct and not s.em  # ranked first among candidates, but greedy decoding says " ce"
    (s,) = score_probes(m, CharTok(), [Probe("ab", " ce", [" cd", " ce"])], device="cpu")
    assert s.correct and s.em


def test_ties_are_not_counted_correct():
    m = Table(28)  # all-zero logits: every candidate ties
    (s,) = score_probes(m, CharTok(), [Probe("a", " b", [" b", " c"])], device="cpu")
    assert not s.correct and s.margin == 0.0


def test_batched_scores_equal_one_sequence_at_a_time_on_a_real_gpt():
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=28, n_layer=2, d_model=32, n_head=4, n_kv_head=2, max_seq_len=32))
    words = ["ab", "hello there", "a much longer prompt here", "zz", "the quick brown fox"]
    pairs = [(w, c) for w in words for c in ("q", "rs")]  # candidate lists of 3..5, answers of 2..3 tokens
    probes = [Probe(w, f" {c}", [" x", " yy", " zzz", " c"][: 2 + i % 3] + [f" {c}"], id=str(i))
              for i, (w, c) in enumerate(pairs)]
    ref = []
    for p in probes:  # direct: [bos] + prompt + answer, unpadded
        ids = [0] + CharTok().encode(p.prompt + p.answer)
        n = len(p.answer)
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
        ref.append(sum(float(lp[t - 1, ids[t]]) for t in range(len(ids) - n, len(ids))))
    for bs in (1, 3, 64):
        scores = score_probes(model, CharTok(), probes, batch_size=bs, device="cpu")
        assert [s.answer_logprob for s in scores] == pytest.approx(ref, abs=1e-4), bs
    # a prompt longer than the context keeps its end (the model never sees more than max_seq_len tokens)
    long = Probe("ab " * 20 + "ab", " c", [" c", " d"])
    (s,) = score_probes(model, CharTok(), [long], device="cpu")
    ids = ([0] + CharTok().encode(long.prompt + " c"))[-32:]
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
    assert s.answer_logprob == pytest.approx(float(lp[-3, ids[-2]] + lp[-2, ids[-1]]), abs=1e-4)
    with pytest.raises(ValueError, match="encodes to 40 tokens"):
        score_probes(model, CharTok(), [Probe("a", " " * 40, [" " * 40])], device="cpu")


class DummyPrefixTok:
    """SentencePiece-like: spaces become '▁' and a '▁' is prepended, so ' hot' alone is [▁, ▁hot] but inside
    'Fire feels hot' it is [▁hot]; '▁feels▁cold' is one token, merging across the prompt boundary."""

    bos_id = 0
    vocab = ["<s>", "▁", "▁fire", "▁feels", "▁hot", "▁cold", "▁feels▁cold"]

    def encode(self, s: str) -> list[int]:
        text, out = "▁" + s.lower().replace(" ", "▁"), []
        while text:
            best = max((v for v in self.vocab[1:] if text.startswith(v)), key=len)
            out.append(self.vocab.index(best))
            text = text[len(best):]
        return out


def test_candidate_tokens_follow_the_joint_encoding():
    m = Table(7)
    torch.manual_seed(1)
    with torch.no_grad():
        m.w.normal_()
    lp = torch.log_softmax(m.w.detach(), -1)
    (hot,) = score_probes(m, DummyPrefixTok(), [Probe("Fire feels", " hot", [" hot", " cold"])], device="cpu")
    assert hot.n_answer_tokens == 1 and hot.answer_logprob == pytest.approx(float(lp[3, 4]), abs=1e-5)  # ▁feels -> ▁hot
    # ' cold' merges with the prompt's last token: fall back to the candidate encoded alone, [▁, ▁cold]
    (cold,) = score_probes(m, DummyPrefixTok(), [Probe("Fire feels", " cold", [" hot", " cold"])], device="cpu")
    assert cold.n_answer_tokens == 2 and cold.answer_logprob == pytest.approx(float(lp[3, 1] + lp[1, 5]), abs=1e-5)


def test_perplexity_exact_on_hand_set_logits():
    m = Table(5)
    torch.manual_seed(2)
    with torch.no_grad():
        m.w.normal_()
    rows = torch.tensor([[0, 1, 2, 3], [4, 3, 2, 1], [2, 2, 2, 0]])  # [N, T+1]
    token_bytes = torch.tensor([0, 1, 2, 3, 4])
    lp = torch.log_softmax(m.w.detach(), -1)
    nll = -sum(float(lp[r[t], r[t + 1]]) for r in rows.tolist() for t in range(3))
    n_bytes = sum(int(token_bytes[r[t + 1]]) for r in rows.tolist() for t in range(3))
    out = perplexity(m, rows, token_bytes, batch_size=2)
    assert out["nll"] == pytest.approx(nll / 9, abs=1e-6) and out["ppl"] == pytest.approx(math.exp(nll / 9), rel=1e-6)
    assert out["bpb"] == pytest.approx(nll / math.log(2) / n_bytes, abs=1e-6) and out["tokens"] == 9
    assert "bpb" not in perplexity(m, rows)
    with pytest.raises(ValueError, match="rows"):
        perplexity(m, rows[:, :1])


def test_evaluator_serves_a_hugging_face_model():
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer as HFTok
    from tokenizers import decoders, models, pre_tokenizers, trainers

    core = HFTok(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    texts = ["Fire feels hot.", "Ice feels cold.", "The sky is blue. Grass is green.", "café naïve 日本"] * 20
    core.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=120, special_tokens=["<s>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>")
    tok = HFTokenizer(hf_tok)
    tb = tok.token_bytes()
    for text in texts[:4]:  # bytes per token add up to the text's UTF-8 length, specials count 0
        assert int(tb[tok.encode(text)].sum()) == len(text.encode()) and tb[tok.bos_id] == 0
    cfg = transformers.LlamaConfig(vocab_size=len(hf_tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    probes = [Probe("Fire feels", " hot", [" hot", " cold"]), Probe("The sky is", " blue", [" green", " blue"])]
    scores = score_probes(model, hf_tok, probes, device="cpu")
    for p, s in zip(probes, scores):
        prompt, full = tok.encode(p.prompt), tok.encode(p.prompt + p.answer)
        ids = torch.tensor([[tok.bos_id, *full]])
        with torch.no_grad():
            lp = torch.log_softmax(model(ids).logits[0].float(), -1)
        ref = sum(float(lp[t, ids[0, t + 1]]) for t in range(len(prompt), len(full)))
        assert s.nll == pytest.approx(-ref, abs=1e-5)
    rows = torch.tensor([[tok.bos_id, *tok.encode("Fire feels hot. Ice feels cold.")][:9]])
    out = perplexity(model, rows, tb)
    with torch.no_grad():
        ref = torch.nn.functional.cross_entropy(model(rows[:, :-1]).logits[0].float(), rows[0, 1:])
    assert out["nll"] == pytest.approx(float(ref), abs=1e-5) and out["bpb"] > 0


class WordTok:
    """One token per space-led word (' hot' is one token), ids in order of first sight; BOS 0."""

    bos_id = 0

    def __init__(self) -> None:
        self.ids: dict[str, int] = {}

    def encode(self, s: str) -> list[int]:
        words = [w if i == 0 and not s.startswith(" ") else f" {w}" for i, w in enumerate(s.split(" ")) if w]
        return [self.ids.setdefault(w, len(self.ids) + 1) for w in words]


def test_one_token_candidates_sharing_the_prompt_score_as_full_sequences():
    """One-token candidates are scored from the prompt's own sequence; every score equals the direct forward of
    [bos] + prompt + candidate, also next to multi-token candidates and at the context limit."""
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=40, n_layer=2, d_model=32, n_head=4, n_kv_head=2, max_seq_len=8))
    tok = WordTok()
    probes = [Probe("fire feels", " hot", [" hot", " cold", " very warm"], id="a"),
              Probe("the sky is", " blue", [" blue", " red", " green"], id="b"),
              Probe("a b c d e f", " g", [" g", " h"], id="c"),  # prompt of 7 with bos: one-token fits exactly
              Probe("a b c d e f g", " h", [" h", " i j"], id="d")]  # prompt of 8: full sequences, ends kept
    scores = score_probes(model, tok, probes, device="cpu")
    for p, s in zip(probes, scores):
        direct = []
        for c in p.candidates:
            ids = ([0] + tok.encode(p.prompt + c))[-8:]
            n = len(tok.encode(c))
            with torch.no_grad():
                lp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
            direct.append((sum(float(lp[t - 1, ids[t]]) for t in range(len(ids) - n, len(ids))),
                           all(int(lp[t - 1].argmax()) == ids[t] for t in range(len(ids) - n, len(ids))), n))
        a = p.candidates.index(p.answer)
        means = [v / n for v, _, n in direct]
        assert s.answer_logprob == pytest.approx(direct[a][0], abs=1e-4) and s.em == direct[a][1]
        assert s.margin == pytest.approx(means[a] - max(m for j, m in enumerate(means) if j != a), abs=1e-4)
        assert s.best == p.candidates[max(range(len(means)), key=means.__getitem__)]


@pytest.mark.parametrize("split", [False, True])
def test_shared_prefix_through_the_kv_cache_equals_the_whole_forward(monkeypatch, split):
    """Probes that all follow one long story (the arena's recall proxy) run the story once and the questions on
    copies of its KV cache: the same scores as the whole-sequence forward, on a tiny Llama and on the same
    Llama after the surgery head split (the arena's surgery learner)."""
    transformers = pytest.importorskip("transformers")
    import topocl.evaluate as ev

    cfg = transformers.LlamaConfig(vocab_size=120, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    if split:
        from topocl.surgery import HeadSplitConfig, apply_head_split

        apply_head_split(model, HeadSplitConfig(topk=2))
    tok = WordTok()
    story = " ".join(f"w{i % 37}" for i in range(90))
    probes = [Probe(f"{story} who holds the sword", " tom", [" tom", " ann", " the old king"], id="a"),
              Probe(f"{story} where is it kept", " farm", [" farm", " inn"], id="b"),
              Probe(f"{story} on which night", " first", [" first", " second night", " third"], id="c")]
    used = []
    real = ev._cached_prefix
    monkeypatch.setattr(ev, "_cached_prefix", lambda *a: used.append(real(*a)) or used[-1])
    fast = score_probes(model, tok, probes, device="cpu")
    assert used and all(n >= ev.SHARED_PREFIX_MIN for n in used)  # the cached path ran
    ref = score_probes(model, tok, probes, device="cpu", share_prefix=False)
    for f, r in zip(fast, ref):
        assert f.answer_logprob == pytest.approx(r.answer_logprob, abs=1e-4)
        assert f.margin == pytest.approx(r.margin, abs=1e-4) and f.margin_sum == pytest.approx(r.margin_sum, abs=1e-4)
        assert f.best == r.best and f.em == r.em
