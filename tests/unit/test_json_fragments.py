"""JSON-fragment streaming: whatever the chunking, the events are exactly the
top-level members (array members element by element) or top-level array
elements, in order, each a whole value (hypothesis)."""
import json

from hypothesis import given, settings, strategies as st

from llmesh.services.router.http_api.json_fragments import JsonFragments, member_path

scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6),
                    st.floats(allow_nan=False, allow_infinity=False, width=32),
                    st.text(max_size=8))
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=4)),
    max_leaves=15)


def expected(value):
    if isinstance(value, dict):
        out = []
        for k, v in value.items():
            path = member_path("$", k)
            if isinstance(v, list) and v:
                out += [(f"{path}[{i}]", e) for i, e in enumerate(v)]
            else:
                out.append((path, v))
        return out
    if isinstance(value, list):
        return [(f"$[{i}]", e) for i, e in enumerate(value)]
    return [("$", value)]


@settings(max_examples=300, deadline=None)
@given(value=values, seps=st.sampled_from([(",", ":"), (", ", ": ")]),
       cuts=st.lists(st.integers(0, 400), max_size=12))
def test_events_are_the_completed_values_whatever_the_chunks(value, seps, cuts):
    text = json.dumps(value, separators=seps)
    points = sorted({c % (len(text) + 1) for c in cuts} | {0, len(text)})
    parser = JsonFragments()
    events = []
    for a, b in zip(points, points[1:]):
        events += parser.feed(text[a:b])
    events += parser.finish()
    assert events == expected(value)
    for _, v in events:  # each stands alone
        assert json.loads(json.dumps(v)) == v


def test_a_member_is_emitted_as_soon_as_it_is_whole():
    p = JsonFragments()
    assert p.feed('{"title": "Du') == []
    assert p.feed('ne", "year": 19') == [("$.title", "Dune")]
    assert p.feed('65, "tags": ["a", ') == [("$.year", 1965), ("$.tags[0]", "a")]
    assert p.feed('"b"], "x y": {"k": [1]}}') == [("$.tags[1]", "b"), ('$["x y"]', {"k": [1]})]
