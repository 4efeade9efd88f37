"""One rule hands a site's name and its declared-cases pin to the node it comes back as."""

from __future__ import annotations

from fedseg.server.run.replies import SiteRegistry


def test_a_rejoined_site_keeps_its_first_cap_under_every_entry_point() -> None:
    registry = SiteRegistry()
    registry.pin(1, "hospital-a", 5)
    assert registry.declared(7, "hospital-a") == 5  # a new node carrying the name inherits the cap
    registry.pin(7, "hospital-a", 100_000)  # it rejoined and now claims more
    assert registry.names == {7: "hospital-a"} and registry.cases == {7: 5}
    registry.lock({9: "hospital-a"})  # a resumed run registers its key as node 9
    assert registry.names == {9: "hospital-a"} and registry.cases == {9: 5}
    assert registry.declared(3, "nobody") is None
