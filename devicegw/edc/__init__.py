"""The subscriber side of the contract: the contract checker, the EDC client, exports."""
