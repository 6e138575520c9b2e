"""The reconcile JSON writes each payment line by hand: it must be exactly what json.dumps
gives for the payment's entry of ``to_dict`` (the document is a fixed interface)."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from disburser.reconcile import PaymentResult, Status
from disburser.report import _payment_json

text = st.text(max_size=40)  # quotes, backslashes, control and non-ASCII characters


@settings(max_examples=300, deadline=None)
@given(program=text, pid=text, reason=st.none() | text, idx=st.integers(0, 10**6),
       amount=st.integers(0, 2**256 - 1), paid=st.integers(0, 2**256 - 1),
       status=st.sampled_from(list(Status)),
       hashes=st.lists(st.binary(min_size=32, max_size=32).map(lambda b: "0x" + b.hex()),
                       max_size=3))
def test_payment_line_is_json_dumps_of_its_entry(program: str, pid: str, reason: str | None,
                                                 idx: int, amount: int, paid: int,
                                                 status: Status, hashes: list[str]) -> None:
    p = PaymentResult("0x" + "ab" * 32, program, idx, pid, "0x" + "Cd" * 20, amount, paid,
                      status, tuple(hashes), reason)
    d = {"manifest": p.manifest, "program": p.program, "index": p.idx, "id": p.id,
         "to": p.to, "amount": str(p.amount), "paid": str(p.paid), "status": p.status,
         "tx_hashes": list(p.tx_hashes)}
    if reason is not None:
        d["reason"] = reason
    assert _payment_json(p) == json.dumps(d)
    assert json.loads(_payment_json(p)) == d
