"""The synthetic four-granularity corpus: every record is valid and encodes, items are real, targets carry loss."""
import json
import os
from collections import Counter

import pytest

from megatron_onereason.data.formats import SampleEncoder, SampleError, parse_json_line, parse_sample
from megatron_onereason.data.synthetic_catalog import make_synthetic_catalog
from megatron_onereason.data.synthetic_corpus import CORPUS_FILES, CorpusConfig, generate_corpus, items_from_catalogs
from megatron_onereason.tokenizer.catalog_builder import CatalogInputs, build_itemic_tokenizer
from megatron_onereason.tokenizer.item_catalog import ItemCatalog
from megatron_onereason.tokenizer.itemic_tokens import DEFAULT_SCHEME, preset
from megatron_onereason.tokenizer.rq_kmeans import RQKMeansConfig
from megatron_onereason.tools.make_synthetic_corpus import main


@pytest.fixture(scope="module")
def catalogs(tmp_path_factory):
    """Synthetic catalog (captions) and its itemic catalog (RQ-KMeans codes, 3 x 32), through the real tools."""
    root = tmp_path_factory.mktemp("catalogs")
    synthetic = make_synthetic_catalog(items_per_domain=40, dim=16, clusters_per_domain=4, seed=0)
    synthetic.save(str(root / "synthetic"))
    build_itemic_tokenizer(
        CatalogInputs(embeddings=str(root / "synthetic" / "embeddings.npy"),
                      ids=str(root / "synthetic" / "items.parquet"), domain_column="domain"),
        RQKMeansConfig(levels=3, codebook_size=32, niter=5, train_sample_size=0), str(root / "itemic"))
    return synthetic, ItemCatalog.load(str(root / "itemic")), root


def test_every_record_parses_encodes_and_names_real_items(catalogs, tokenizers_3x32):
    synthetic, catalog, _ = catalogs
    corpus = generate_corpus(items_from_catalogs(synthetic, catalog), CorpusConfig(samples_per_task=15))
    assert list(corpus) == list(CORPUS_FILES)
    encoder = SampleEncoder(tokenizers_3x32["extended"])
    sources = Counter()
    for name, records in corpus.items():
        samples = [parse_sample(json.loads(json.dumps(r))) for r in records]  # JSON round trip, as on disk
        for record, sample, encoded in zip(records, samples, encoder.encode(samples)):
            assert not isinstance(encoded, SampleError), (record, encoded)
            assert encoded.lossmask.sum() > 0 and (encoded.lossmask == 0).sum() > 0  # context and target
            assert sample.kind == ("chat" if name == "sft_chat" else "segments")
            text = "".join(s.text for s in sample.segments)
            for _, _, item_id in catalog.item_ids_in_text(text, DEFAULT_SCHEME):  # raises for a pattern no item has
                assert item_id in catalog.item_ids
            sources[(name, record["source"])] += 1
    assert {s for _, s in sources} == {
        "single_token_semantics", "compositional_prefix_semantics", "prefix_itemic_token_grounding",
        "part_to_whole_semantics", "item_captioning", "item_grounding", "item_qa", "direct_item_to_item",
        "multi_item_interest_flow", "domain_grouped_behavior", "chronological_interleaved_behavior",
        "sft_caption_think", "sft_caption_nothink", "sft_recommend_think"}


def test_content_follows_the_granularities(catalogs):
    synthetic, catalog, _ = catalogs
    items = items_from_catalogs(synthetic, catalog)
    caption_of = {DEFAULT_SCHEME.format_item(i.domain, i.codes): i.caption for i in items}
    corpus = generate_corpus(items, CorpusConfig(samples_per_task=30, seed=3))
    by_source = {}
    for records in corpus.values():
        for r in records:
            by_source.setdefault(r["source"], []).append(r)
    # Item captioning: the target is the caption of the item named in the context.
    for r in by_source["item_captioning"]:
        (item,) = [p for p in caption_of if p in r["segments"][0]["text"]]
        assert r["segments"][1]["text"] == f"It is a {caption_of[item]}."
    # Interleaved histories replace some items by their captions, and keep others as itemic patterns.
    timelines = "".join(r["segments"][1]["text"] for r in by_source["chronological_interleaved_behavior"])
    assert "[" in timelines and "_begin|>" in timelines
    # Prefix semantics: the question names a two-code prefix with no domain begin token.
    for r in by_source["compositional_prefix_semantics"]:
        assert "_begin|>" not in r["segments"][0]["text"] and "<b_" in r["segments"][0]["text"]
    # SFT: thinking samples carry reasoning, non-thinking ones none.
    assert all("reasoning" in r["messages"][-1] for r in by_source["sft_caption_think"])
    assert all("reasoning" not in r["messages"][-1] for r in by_source["sft_caption_nothink"])
    assert any(m["content"].endswith("/no_think") for r in by_source["sft_caption_nothink"] for m in r["messages"])


def test_deterministic_given_seed(catalogs):
    synthetic, catalog, _ = catalogs
    items = items_from_catalogs(synthetic, catalog)
    a = generate_corpus(items, CorpusConfig(samples_per_task=5, seed=1))
    assert a == generate_corpus(items, CorpusConfig(samples_per_task=5, seed=1))
    assert a != generate_corpus(items, CorpusConfig(samples_per_task=5, seed=2))


def test_cli_writes_jsonl(catalogs, tmp_path):
    _, _, root = catalogs
    out = tmp_path / "corpus"
    main(["--synthetic-catalog", str(root / "synthetic"), "--item-catalog", str(root / "itemic"), "--out", str(out),
          "--samples-per-task", "3"])
    assert sorted(os.listdir(out)) == sorted(f"{n}.jsonl" for n in CORPUS_FILES)
    lines = (out / "token_granularity.jsonl").read_text().splitlines()
    assert len(lines) == 4 * 3 and all(parse_sample(parse_json_line(line)) for line in lines)
    assert main(["--synthetic-catalog", str(root / "synthetic"), "--item-catalog", str(root / "itemic"), "--out",
                 str(out)]) == 1  # FileExistsError: one line from run_cli


def test_corpus_in_the_openonerec_scheme_encodes_with_its_tokenizer(catalogs, tokenizers_3x32, tmp_path):
    """``--itemic-vocab`` writes every item and code token in the model's scheme; the encoder's itemic-count check
    (text vs tokens) then holds for every record."""
    from megatron_onereason.tokenizer.vocab_extension import extend_vocabulary

    _, _, root = catalogs
    model = str(tmp_path / "oor")
    extend_vocabulary(tokenizers_3x32["base"], model, preset("openonerec", codebook_size=32))
    out = tmp_path / "corpus"
    main(["--synthetic-catalog", str(root / "synthetic"), "--item-catalog", str(root / "itemic"), "--out", str(out),
          "--samples-per-task", "4", "--itemic-vocab", model])
    encoder = SampleEncoder(model)
    text = ""
    for name in CORPUS_FILES:
        samples = [parse_sample(parse_json_line(line)) for line in (out / f"{name}.jsonl").read_text().splitlines()]
        for encoded in encoder.encode(samples):
            assert not isinstance(encoded, SampleError), encoded
        text += "".join(seg.text for sample in samples for seg in sample.segments)
    assert "<|sid_begin|><s_a_" in text and "<|sid_end|>" in text and "_begin|><a_" not in text
