// SPDX-License-Identifier: MIT
pragma solidity ^0.8.20;

interface IERC20TransferFrom {
    function transferFrom(address from, address to, uint256 value) external returns (bool);
}

/// @title PlainDisperse
/// @notice Benchmark baseline only, never deployed for real payouts: a plain loop of
/// `transferFrom(msg.sender, recipient, amount)` with no paid-bitmap. BatchPayout's gas is
/// measured against it.
contract PlainDisperse {
    function disperse(address token, address[] calldata recipients, uint256[] calldata amounts) external {
        require(recipients.length == amounts.length, "PlainDisperse: length mismatch");
        IERC20TransferFrom t = IERC20TransferFrom(token);
        for (uint256 i; i < recipients.length;) {
            require(t.transferFrom(msg.sender, recipients[i], amounts[i]), "PlainDisperse: transfer failed");
            unchecked {
                ++i;
            }
        }
    }
}
