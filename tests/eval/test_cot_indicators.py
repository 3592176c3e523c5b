"""CoT indicators: γ_legal / γ_hist|legal by hand (eqs. 24–25); ΔLL and ℓ_t from a tiny model's real log-probs."""
import numpy as np
import pytest
import torch

from megatron_onereason.eval.cot_indicators import (
    CatalogPatterns,
    cot_context,
    cot_item_references,
    cot_likelihood_gain,
    history_validity,
    item_legality,
    likelihood_progression,
    decoded_token_texts,
    segment_boundaries,
    target_log_likelihoods,
)
from megatron_onereason.generation.prompts import ChatTokens
from megatron_onereason.model.hf_qwen3 import make_hf_qwen3
from megatron_onereason.model.qwen3_config import qwen3_preset
from megatron_onereason.tokenizer.item_catalog import ItemCatalog
from megatron_onereason.tokenizer.itemic_tokens import preset

REPORT = preset("onereason_report")
V123 = "<|video_begin|><a_1><b_2><c_3>"
P012 = "<|prod_begin|><a_0><b_1><c_2>"
V777 = "<|video_begin|><a_7><b_7><c_7>"
BROKEN = "<|video_begin|><a_5><b_1>"
NOT_IN_CATALOG = "<|ad_begin|><a_1><b_1><c_1>"
COT = (f"The user watched {V123} twice ({V123}), bought {P012}; maybe {BROKEN} or {NOT_IN_CATALOG}. "
       "Also <a_4> alone is a code token, not an item.")


def test_item_references_are_a_set_with_malformed_patterns():
    assert cot_item_references(COT, REPORT) == {V123, P012, BROKEN, NOT_IN_CATALOG}
    assert cot_item_references("no items here", REPORT) == set()
    sid = "<|sid_begin|><s_a_1><s_b_2><s_c_3><|sid_end|>"
    assert cot_item_references(f"{sid}, {sid[:-11]} and {V123}", preset("openonerec")) == {sid, sid[:-11]}


def test_legality_and_history_validity_by_hand():
    refs = cot_item_references(COT, REPORT)
    catalog = {V123, P012, V777}
    assert item_legality(refs, catalog) == pytest.approx(2 / 4)  # V123, P012 legal; BROKEN, NOT_IN_CATALOG not
    assert history_validity(refs, catalog, history={V123, V777}) == pytest.approx(1 / 2)  # of {V123, P012}
    assert history_validity(refs, catalog, history=set()) == 0.0
    assert item_legality(set(), catalog) is None  # a CoT citing no item is not scored
    assert history_validity({BROKEN}, catalog, {V123}) is None


def test_catalog_patterns_container_matches_the_item_catalog():
    codes = np.array([[1, 2, 3], [0, 1, 2], [7, 7, 7]])
    catalog = ItemCatalog(["v1", "p0", "v7"], ["video", "prod", "video"], codes, 8)
    patterns = CatalogPatterns(catalog, REPORT)
    assert [p in patterns for p in (V123, P012, V777, BROKEN, NOT_IN_CATALOG)] == [True, True, True, False, False]
    assert "<|prod_begin|><a_1><b_2><c_3>" not in patterns  # the codes of a video item under another domain
    sid = CatalogPatterns(catalog, preset("openonerec"))  # a shared begin token: the codes decide
    assert "<|sid_begin|><s_a_1><s_b_2><s_c_3><|sid_end|>" in sid and "<|sid_begin|><s_a_1><s_b_2><s_c_3>" not in sid
    refs = cot_item_references(COT, REPORT)
    assert item_legality(refs, patterns) == pytest.approx(2 / 4)


def test_segment_boundaries_by_hand():
    assert segment_boundaries(["Hi", " there", ".", " Next", "\n", "end"]) == [3, 5, 6]
    assert segment_boundaries(["a", "b"]) == [2]
    assert segment_boundaries(["a", "!"]) == [2]
    assert segment_boundaries([]) == []
    assert segment_boundaries(["3.5", " GB", " or", " x", ".\""]) == [5]  # a decimal point ends nothing


def test_chinese_cot_splits_at_cjk_sentence_ends(tokenizers_3x32):
    """The report's CoTs are Chinese: 。！？ end segments, also when a character spans several byte-level tokens."""
    from transformers import AutoTokenizer

    assert segment_boundaries(["用户", "喜欢", "。", "他", "！", "好", "？”", "的"]) == [3, 5, 7, 8]
    tokenizer = AutoTokenizer.from_pretrained(tokenizers_3x32["base"])
    sentences = ["用户喜欢射击游戏。", "他常看直播！", "下一步会看什么？", "装备讲解\n", "结束"]
    ids = tokenizer.encode("".join(sentences), add_special_tokens=False)
    texts = decoded_token_texts(tokenizer, ids)
    assert "".join(texts) == "".join(sentences) and len(texts) == len(ids)
    assert len(ids) > len("".join(sentences))  # the tiny tokenizer splits CJK characters into byte tokens
    bounds = segment_boundaries(texts)
    segments = [tokenizer.decode(ids[a:b]) for a, b in zip([0, *bounds[:-1]], bounds)]
    assert segments == sentences


CHAT = ChatTokens(think_end_id=1000, answer_separator_ids=(198, 198), stop_ids=(1001, 1002))


@pytest.fixture(scope="module")
def model():
    return make_hf_qwen3(qwen3_preset("tiny"), seed=7)


def token_by_token_log_likelihood(model, context, target):
    """Independent oracle: feed the growing sequence one step at a time, read the next-token distribution."""
    total, seq = 0.0, list(context)
    with torch.no_grad():
        for token in target:
            logits = model(torch.tensor([seq])).logits[0, -1].double()
            total += float(torch.log_softmax(logits, -1)[token])
            seq.append(token)
    return total


def test_delta_ll_from_real_model_log_probs(model):
    gen = torch.Generator().manual_seed(0)

    def rand(n):
        return torch.randint(0, 900, (n,), generator=gen).tolist()

    thinking_prompts = [rand(7), rand(4), rand(9)]
    reasoning = [rand(5), rand(11), rand(2)]
    plain_prompts = [rand(8), rand(3), rand(6)]
    targets = [rand(4), rand(4), rand(2)]
    with_cot = [cot_context(p, c, CHAT) for p, c in zip(thinking_prompts, reasoning)]
    assert with_cot[0] == thinking_prompts[0] + reasoning[0] + [1000, 198, 198]
    got = cot_likelihood_gain(model, with_cot, plain_prompts, targets, batch_size=2)  # padding and two batches
    want = [token_by_token_log_likelihood(model, c, t) - token_by_token_log_likelihood(model, p, t)
            for c, p, t in zip(with_cot, plain_prompts, targets)]
    assert got.tolist() == pytest.approx(want, abs=1e-4)
    assert abs(want[0]) > 1e-3  # the two contexts really differ for the model


def test_likelihood_progression_along_cot_prefixes(model):
    prompt, cot, target = [5, 6, 7, 8], [11, 12, 13, 14, 15, 16, 17], [20, 21, 22, 23]
    curve = likelihood_progression(model, prompt, cot, [2, 5, 7], target, CHAT)
    want = [token_by_token_log_likelihood(model, prompt + cot[:end] + [1000, 198, 198], target) for end in (0, 2, 5, 7)]
    assert curve == pytest.approx(want, abs=1e-4)
    full = target_log_likelihoods(model, [cot_context(prompt, cot, CHAT)], [target])
    assert curve[-1] == pytest.approx(float(full[0]), abs=1e-6)  # ℓ_T is the full-CoT likelihood of eq. 21
    with pytest.raises(ValueError, match="boundaries"):
        likelihood_progression(model, prompt, cot, [5, 2], target, CHAT)
