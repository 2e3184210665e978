"""The ledger's keys and tenants: the table routers check keys against, and the admin changes
(create, revoke, rotate a key; set a tenant's rules).

Mixed into ``Ledger`` (``ledger.py``), whose ``keys``, ``tenants``, ``version``, ``store`` and
``clock`` it uses. Each admin change comes in three steps, so the service can write the store on a
worker thread and change the tables on its event loop: plan (no effect), save (the store only),
apply (memory).
"""

from __future__ import annotations

from serve_app.governance.keys import KeyRecord, KeySpec, TenantSpec, new_key


class KeyBook:
    def key_table(self) -> dict:
        """What routers need to check keys locally, and the residency and tiers they carry."""
        return {"version": self.version,
                "keys": [{"id": r.id, "hash": r.hash, "spec": r.spec.model_dump(mode="json"),
                          "created_at": r.created_at, "revoked_at": r.revoked_at} for r in self.keys.values()],
                "tenants": {n: s.model_dump(mode="json") for n, s in self.tenants.items()}}

    def plan_key(self, spec: KeySpec) -> tuple[KeyRecord, str]:
        key_id, plaintext, digest = new_key()
        return KeyRecord(key_id, digest, spec, self.clock()), plaintext

    def plan_revoke(self, key_id: str) -> KeyRecord | None:
        """The revoked record (``None``: no such key); an already revoked key comes back as it is."""
        record = self.keys.get(key_id)
        if record is None or record.revoked_at is not None:
            return record
        return KeyRecord(record.id, record.hash, record.spec, record.created_at, self.clock())

    def save_key(self, record: KeyRecord) -> None:
        self.store.put_key(record.id, record.tenant, record.hash, record.spec.model_dump(mode="json"),
                           record.created_at, record.revoked_at)

    def apply_key(self, record: KeyRecord) -> None:
        if self.keys.get(record.id) != record:
            self.keys[record.id] = record
            self.version += 1

    def save_tenant(self, name: str, spec: TenantSpec) -> None:
        self.store.put_tenant(name, spec.model_dump(mode="json"), self.clock())

    def apply_tenant(self, name: str, spec: TenantSpec) -> None:
        self.tenants[name] = spec
        self.version += 1

    def create_key(self, spec: KeySpec) -> tuple[KeyRecord, str]:
        record, plaintext = self.plan_key(spec)
        self.save_key(record)
        self.apply_key(record)
        return record, plaintext

    def revoke_key(self, key_id: str) -> KeyRecord | None:
        record = self.plan_revoke(key_id)
        if record is not None:
            self.save_key(record)
            self.apply_key(record)
        return record

    def rotate_key(self, key_id: str) -> tuple[KeyRecord, str] | None:
        """A new key with the same rules; the old one is revoked at once."""
        old = self.keys.get(key_id)
        if old is None or old.revoked_at is not None:
            return None
        created = self.create_key(old.spec)
        self.revoke_key(key_id)
        return created

    def set_tenant(self, name: str, spec: TenantSpec) -> None:
        self.save_tenant(name, spec)
        self.apply_tenant(name, spec)
