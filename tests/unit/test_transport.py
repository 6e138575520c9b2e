"""The JSON-RPC transport's retry decisions, driven without a network: the HTTP layer is
replaced, sleep and randomness are parameters."""

from __future__ import annotations

from typing import Any

import pytest

from disburser import chain as ch
from disburser.errors import RpcError


class Scripted(ch.Transport):
    def __init__(self, answers: list[Any]) -> None:
        self.sleeps: list[float] = []
        super().__init__("http://127.0.0.1:1", retries=3, sleep=self.sleeps.append,
                         rand=lambda: 0.5)
        self.answers = answers
        self.posts = 0

    def _post(self, payload: Any) -> Any:
        self.posts += 1
        a = self.answers.pop(0)
        if isinstance(a, Exception):
            raise a
        return {"jsonrpc": "2.0", "id": payload["id"], **a}


def test_rate_limit_inside_a_200_answer_is_retried_with_backoff() -> None:
    limited = {"error": {"code": -32005, "message": "daily request rate limit exceeded"}}
    t = Scripted([limited, limited, {"result": "0x1"}])
    assert t.call("eth_chainId") == "0x1"
    assert t.posts == 3 and t.sleeps == [0.5, 1.0]


def test_rate_limit_gives_up_after_the_retries() -> None:
    limited = {"error": {"code": 429, "message": "Too Many Requests"}}
    t = Scripted([limited] * 4)
    with pytest.raises(ch.NodeError, match="Too Many Requests"):
        t.call("eth_chainId")
    assert t.posts == 4


@pytest.mark.parametrize("message, cls", [
    ("already known", ch.AlreadyKnown),
    ("nonce too low: next nonce 7, tx nonce 5", ch.NonceTooLow),
    ("replacement transaction underpriced", ch.Underpriced),
    ("insufficient funds for gas * price + value", ch.InsufficientFunds),
    ("intrinsic gas too high -- tx.gas_limit > env.cfg.tx_gas_limit_cap", ch.GasCapExceeded),
    ("execution reverted: Blacklistable: account is blacklisted", ch.Reverted),
    ("query returned more than 10000 results", ch.NodeError),
])
def test_node_errors_are_typed_and_not_retried(message: str, cls: type) -> None:
    t = Scripted([{"error": {"code": -32000, "message": message}}])
    with pytest.raises(cls):
        t.call("eth_sendRawTransaction", ["0x"])
    assert t.posts == 1


def test_transport_failure_names_the_node() -> None:
    """And why, in the operating system's words: requests buried them past the 200
    characters a line showed ("... Failed to establish a new connection: [E")."""
    t = ch.Transport("http://127.0.0.1:9", retries=1, sleep=lambda _: None, timeout=0.5)
    with pytest.raises(RpcError) as e:
        t.call("eth_chainId")
    assert str(e.value) == ("node at http://127.0.0.1:9 unreachable after 2 tries: Connection "
                            "refused")


@pytest.mark.parametrize("url", [
    "http://user:pw-s3cret@127.0.0.1:9/v3/KEY-s3cret?apikey=Q-s3cret",
    # requests quotes what it prints: "%7B" for "{", "%20" for a space
    "http://127.0.0.1:9/v3/K{E}Y^s3cret|x?apikey=Q s3cret",
], ids=["plain", "quoted"])
def test_transport_failure_keeps_the_secrets_of_the_url_out(url: str) -> None:
    """Providers put API keys in the path or the query, some a password in the user part;
    requests quotes the path in its error ("Max retries exceeded with url: /v3/KEY")."""
    t = ch.Transport(url, retries=1, sleep=lambda _: None, timeout=0.5)
    with pytest.raises(RpcError) as e:
        t.call("eth_chainId", [])
    assert str(e.value).startswith("node at http://127.0.0.1:9 unreachable after 2 tries: ")
    assert "s3cret" not in str(e.value) and str(e.value).endswith(": Connection refused")


def test_an_error_without_the_systems_reason_keeps_the_url_secrets_out() -> None:
    """A connect timeout says no "[Errno ...]": its text (requests quotes the path and query)
    is shown, less every secret of the URL. The tests above end in the operating system's
    reason and no longer see the URL at all."""
    url = "http://user:pw-s3cret@127.0.0.1:9/v3/KEY-s3cret?apikey=Q-s3cret"
    text = ("HTTPConnectionPool(host='127.0.0.1', port=9): Max retries exceeded with url: "
            "/v3/KEY-s3cret?apikey=Q-s3cret (Caused by ConnectTimeoutError(<urllib3.connection"
            ".HTTPConnection object>, 'Connection to 127.0.0.1 timed out. (connect timeout=1)'))")
    got = ch._short(Exception(text), url)
    assert "s3cret" not in got and got.startswith("HTTPConnectionPool(host='127.0.0.1', "
                                                  "port=9): Max retries exceeded with url: …")


def test_a_url_requests_cannot_use_is_a_node_error_without_its_secrets() -> None:
    t = ch.Transport("http://127.0.0.1:99999/v3/KEY-s3cret", retries=1,
                     sleep=lambda _: None, timeout=0.5)
    with pytest.raises(RpcError) as e:
        t.call("eth_chainId", [])
    assert str(e.value).startswith("node at http://127.0.0.1: ") and "s3cret" not in str(e.value)


def test_simulate_reads_geth_revert_data_from_the_error() -> None:
    revert = ch.ERROR_STRING.hex() + "20".rjust(64, "0") + "05".rjust(64, "0") + \
        b"nope!".hex().ljust(64, "0")
    geth = {"result": [{"calls": [
        {"status": "0x1", "gasUsed": "0xe26b", "returnData": "0x" + "00" * 31 + "01"},
        {"status": "0x0", "gasUsed": "0x7040", "returnData": "0x",
         "error": {"code": 3, "message": "execution reverted: nope!", "data": "0x" + revert}},
    ]}]}
    c = ch.RpcChain("http://127.0.0.1:1", Scripted([geth]))
    (ok1, used1, _), (ok2, _, ret2) = c.simulate_many("0x" + "11" * 20, "0x" + "22" * 20,
                                                      ["0x", "0x"])
    assert (ok1, used1, ok2) == (True, 57963, False)
    assert ch.decode_revert(ret2) == (None, "nope!")


@pytest.mark.parametrize(("message", "cls"), [
    ("Nonce too high. Expected nonce to be 0 but got 1.", ch.NonceTooHigh),  # Hardhat
    ("nonce is too high", ch.NonceTooHigh),
    ("NonceGap, Future nonce. Expected nonce: 5", ch.NonceTooHigh),  # Nethermind
    ("future transaction tries to replace pending", ch.NonceTooHigh),  # geth, pool full
    ("gapped-nonce tx from delegated accounts", ch.NonceTooHigh),  # geth, EIP-7702
    ("nonce too low: next nonce 7, tx nonce 6", ch.NonceTooLow),  # geth
    ("already known", ch.AlreadyKnown),
    ("replacement transaction underpriced", ch.Underpriced),
    ("txpool is full", ch.NodeError),
    # A re-sent transaction the node already has (the first answer lost): it counts as
    # sent. These stopped the run as definite refusals (review helper-52).
    ("AlreadyKnown", ch.AlreadyKnown),  # Nethermind
    ("INTERNAL_ERROR: existing tx with same hash", ch.AlreadyKnown),  # Erigon
    # A fee below the node's floor: the run waits or bumps, as for geth's "underpriced".
    ("fee too low", ch.Underpriced),  # Erigon
    ("FeeTooLow, MaxFeePerGas too low", ch.Underpriced),  # Nethermind
    ("ReplacementNotAllowed", ch.Underpriced),  # Nethermind
    ("Gas price below current base fee", ch.Underpriced),  # Besu
    ("Gas price below configured minimum gas price", ch.Underpriced),  # Besu
    ("request timed out", ch.ServerTimeout),  # geth -32002: it may have been done
])
def test_node_errors_are_classified_by_their_message(message: str, cls: type) -> None:
    """The send loop's decisions hang on these classes: a later nonce refused for a gap
    (sent first of a pair) must not read as a definite refusal."""
    assert type(ch.classify(-32000, message)) is cls


class BatchScripted(Scripted):
    """Answers each JSON-RPC batch with the next scripted function of its requests."""

    def __init__(self, answers: list[Any]) -> None:
        super().__init__(answers)
        self.sent: list[list[Any]] = []

    def _post(self, payload: Any) -> Any:
        self.sent.append([(c["method"], c["params"]) for c in payload])
        return self.answers.pop(0)(payload)


LIMITED = {"code": -32005, "message": "rate limit exceeded"}


def _answer(limited: set[str]) -> Any:
    """Each request's first parameter back as its result, or a rate limit for those named."""
    def reply(payload: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{"jsonrpc": "2.0", "id": c["id"], "error": LIMITED} if c["params"][0] in limited
                else {"jsonrpc": "2.0", "id": c["id"], "result": c["params"][0]}
                for c in reversed(payload)]  # any order: answers are matched by id
    return reply


def test_batch_sends_again_only_the_elements_rate_limited() -> None:
    t = BatchScripted([_answer({"b", "d"}), _answer({"d"}), _answer(set())])
    got = t.batch([("m", ["a"]), ("m", ["b"]), ("m", ["c"]), ("m", ["d"])])
    assert got == ["a", "b", "c", "d"]
    assert t.sent == [[("m", ["a"]), ("m", ["b"]), ("m", ["c"]), ("m", ["d"])],
                      [("m", ["b"]), ("m", ["d"])], [("m", ["d"])]]
    assert t.sleeps == [0.5, 1.0]


def test_batch_gives_back_an_element_still_rate_limited_after_the_retries() -> None:
    t = BatchScripted([_answer({"b"})] * 4)
    got = t.batch([("m", ["a"]), ("m", ["b"])])
    assert got[0] == "a"
    assert isinstance(got[1], ch.NodeError) and str(got[1]) == "rate limit exceeded"
    assert len(t.sent) == 4 and t.sent[1:] == [[("m", ["b"])]] * 3


def test_batch_rate_limited_as_a_whole_is_sent_again_whole() -> None:
    def whole(_: Any) -> dict[str, Any]:
        return {"jsonrpc": "2.0", "id": None, "error": LIMITED}
    t = BatchScripted([whole, _answer(set())])
    assert t.batch([("m", ["a"]), ("m", ["b"])]) == ["a", "b"]
    assert t.sent == [[("m", ["a"]), ("m", ["b"])]] * 2 and t.sleeps == [0.5]
    t = BatchScripted([whole] * 4)
    with pytest.raises(ch.NodeError, match="rate limit exceeded"):
        t.batch([("m", ["a"])])
    assert len(t.sent) == 4


def test_batch_does_not_retry_other_errors() -> None:
    def refused(payload: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{"jsonrpc": "2.0", "id": c["id"],
                 "error": {"code": -32000, "message": "nonce too low"}} for c in payload]
    t = BatchScripted([refused])
    got = t.batch([("eth_sendRawTransaction", ["0x01"])])
    assert isinstance(got[0], ch.NonceTooLow) and len(t.sent) == 1 and t.sleeps == []


def test_a_host_the_http_client_cannot_parse_is_a_node_error_not_an_internal_one() -> None:
    """Settings refuse such a URL first; a Transport made another way still fails in one
    line, without the URL's secrets."""
    t = ch.Transport("http://u:s3cret@127.0.0..1:1/", retries=0, sleep=lambda _: None)
    with pytest.raises(RpcError) as e:
        t.call("eth_chainId")
    assert str(e.value) == "node at http://127.0.0..1:1: not a usable URL (LocationParseError)"


@pytest.mark.parametrize("error", [
    {"code": 429, "message": "Your app has exceeded its compute units per second capacity. "
     "If you have retries enabled, you can safely ignore this message."},  # Alchemy
    {"code": -32005, "message": "project ID request rate exceeded"},  # Infura
])
def test_batch_retries_the_providers_own_rate_limit_answers(error: dict[str, Any]) -> None:
    """Alchemy throttles a batch element by element with code 429 and words none of the
    phrases named: the element came back as a refusal (a pair's send stopped the run,
    a receipts batch ended the poll)."""
    def reply(payload: Any) -> Any:
        return [{"jsonrpc": "2.0", "id": c["id"], "error": error} if c["params"][0] == "b"
                else {"jsonrpc": "2.0", "id": c["id"], "result": c["params"][0]}
                for c in payload]

    t = BatchScripted([reply, _answer(set())])
    assert t.batch([("m", ["a"]), ("m", ["b"])]) == ["a", "b"]
    assert t.sent[1] == [("m", ["b"])]


def test_a_log_query_too_wide_is_not_a_rate_limit() -> None:
    """-32005 is also a node's answer to a log query over too many results: the range is
    narrowed (transfers.py), not retried for a minute."""
    e = ch.classify(-32005, "query returned more than 10000 results")
    assert not ch.rate_limited(e)


@pytest.mark.parametrize("error", ["internal error", 7])
def test_an_error_member_that_is_no_object_is_a_node_error(error: Any) -> None:
    """It was an AttributeError: an internal error instead of the node's answer."""
    t = Scripted([{"error": error}])
    with pytest.raises(ch.NodeError, match=str(error)):
        t.call("eth_chainId")
    t = BatchScripted([lambda payload: [{"jsonrpc": "2.0", "id": c["id"], "error": error}
                                        for c in payload]])
    (got,) = t.batch([("m", ["a"])])
    assert isinstance(got, ch.NodeError) and str(got) == str(error)
