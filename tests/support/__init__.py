"""Helpers the tests share: brokers, fault injection, event loops."""
