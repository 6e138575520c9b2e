// SPDX-License-Identifier: MIT
pragma solidity ^0.8.28;

/// @title BatchPayout
/// @notice Pays a batch of a signed manifest's payments out of the caller's own tokens, at
/// most once per (payer, token, paymentsRoot, index).
/// @dev No owner, no upgrade path, nothing payable, and it never holds tokens: every payment
/// is `token.transferFrom(msg.sender, recipient, amount)`, so each Transfer log names the
/// payer as `from`, and the payer's allowance to this contract bounds what it can move.
contract BatchPayout {
    /// `indices`, `recipients` and `amounts` differ in length.
    error LengthMismatch();
    /// Payment `index` (its index in the manifest) was refused by the token. `reason` is the
    /// token's raw revert data, or empty (the call to an address without code), or the
    /// ABI-encoded `false` the token returned. The whole batch is reverted.
    error TransferFailed(uint256 index, bytes reason);
    /// `disburse` was called again while a `disburse` was running (from the token).
    error Reentered();

    /// One batch done: `count` payments paid now, totalling `total` base units; `skipped`
    /// entries were already paid (earlier, or earlier in this same batch) and moved nothing.
    event Disbursed(address indexed payer, bytes32 indexed root, uint256 count, uint256 total, uint256 skipped);

    /// payer => token => paymentsRoot => word => 256 "paid" bits (bit i of word w is index
    /// w*256+i).
    /// Keyed by payer, not by root alone: the root is public (it is in every signed manifest
    /// and every proof), so a bitmap keyed only by root would let anyone call `disburse`
    /// with that root, pay one wei of their own tokens to themselves at every index, and mark
    /// the real payer's payments as paid: the payer's batches would then skip, and the
    /// recipients would never be paid. Keyed by msg.sender, only the payer marks its own.
    /// Keyed by token too: the root covers (index, to, amount, id), not the token, so the
    /// same payments paid in another token (a rehearsal token, a bridged USDC.e instead of
    /// native USDC) must not mark them paid in this one.
    mapping(address => mapping(address => mapping(bytes32 => mapping(uint256 => uint256))))
        private _paid;

    /// Reentrancy lock. The loop keeps the current bitmap word on the stack and writes it back
    /// when the word changes; a nested `disburse` by the same payer during a token call would
    /// otherwise set bits that the outer call then overwrites with its stale copy.
    bool private transient _entered;

    /// @notice Pay each `(indices[i], recipients[i], amounts[i])` of manifest `root` from the
    /// caller's balance, skipping indices this caller already paid for `root` in `token`.
    /// @dev Reverts as a whole with `TransferFailed(indices[i], reason)` if the token refuses
    /// any payment, so a simulated call names the culprit. Indices may come in any order and
    /// may repeat: a repeat is skipped. Consecutive indices in the same 256-index word cost one
    /// storage read and one write per word, so ascending indices are cheapest.
    function disburse(
        address token,
        bytes32 root,
        uint256[] calldata indices,
        address[] calldata recipients,
        uint256[] calldata amounts
    ) external {
        if (recipients.length != indices.length || amounts.length != indices.length) revert LengthMismatch();
        if (_entered) revert Reentered();
        _entered = true;

        mapping(uint256 => uint256) storage words = _paid[msg.sender][token][root];
        // The bitmap word of the current index is kept on the stack (`word`) and written back
        // once, when the next index falls in another word and after the loop. A word that is
        // still zero was neither loaded nonzero nor marked, so it needs no write; a word that
        // only had skips is written back unchanged (a warm no-op store, 100 gas).
        // No index maps to word 2**256-1 (index >> 8 < 2**248), so the first index loads.
        uint256 wordIndex = type(uint256).max;
        uint256 word;
        uint256 total;
        uint256 skipped;

        for (uint256 i; i < indices.length;) {
            {
                uint256 index = indices[i];
                if (index >> 8 != wordIndex) {
                    if (word != 0) words[wordIndex] = word;
                    wordIndex = index >> 8;
                    word = words[wordIndex];
                }
                uint256 bit = 1 << (index & 0xff);
                if (word & bit != 0) {
                    unchecked {
                        ++skipped;
                        ++i;
                    }
                    continue;
                }
                // Mark before paying; a refused payment reverts the whole transaction anyway.
                word |= bit;
            }
            uint256 amount = amounts[i];
            if (!_pay(token, recipients[i], amount)) _fail(indices[i]);
            total += amount; // checked: a token that lies about transfers must not wrap it
            unchecked {
                ++i;
            }
        }
        if (word != 0) words[wordIndex] = word;

        _entered = false;
        // Every entry not skipped was paid: a refused one reverts the whole batch.
        unchecked {
            emit Disbursed(msg.sender, root, indices.length - skipped, total, skipped);
        }
    }

    /// @notice Whether `payer` has paid payment `index` of manifest `root` in `token` through
    /// this contract.
    function isPaid(address payer, address token, bytes32 root, uint256 index) external view returns (bool) {
        return (_paid[payer][token][root][index >> 8] >> (index & 0xff)) & 1 == 1;
    }

    /// @notice The raw bitmap word `wordIndex` of (payer, token, root): bit i is index
    /// wordIndex*256+i.
    function paidWord(address payer, address token, bytes32 root, uint256 wordIndex) external view returns (uint256) {
        return _paid[payer][token][root][wordIndex];
    }

    /// @dev `token.transferFrom(msg.sender, to, amount)` as a low-level call, judged like
    /// OpenZeppelin's SafeERC20: success means the call did not revert and returned true, or
    /// returned nothing from an address that has code (tokens without a return value). The
    /// calldata is written past the free memory pointer without moving it, so a long batch
    /// does not grow memory.
    function _pay(address token, address to, uint256 amount) private returns (bool ok) {
        assembly ("memory-safe") {
            let p := mload(0x40)
            mstore(p, shl(224, 0x23b872dd)) // transferFrom(address,address,uint256)
            mstore(add(p, 0x04), caller())
            mstore(add(p, 0x24), to)
            mstore(add(p, 0x44), amount)
            ok := call(gas(), token, 0, p, 0x64, 0x00, 0x20)
            switch returndatasize()
            case 0 { ok := and(ok, gt(extcodesize(token), 0)) }
            default { ok := and(ok, and(gt(returndatasize(), 0x1f), eq(mload(0x00), 1))) }
        }
    }

    /// @dev Revert with `TransferFailed(index, <the last call's return data>)`.
    function _fail(uint256 index) private pure {
        bytes memory reason;
        assembly ("memory-safe") {
            reason := mload(0x40)
            mstore(reason, returndatasize())
            returndatacopy(add(reason, 0x20), 0x00, returndatasize())
            mstore(0x40, add(add(reason, 0x20), and(add(returndatasize(), 0x1f), not(0x1f))))
        }
        revert TransferFailed(index, reason);
    }
}
