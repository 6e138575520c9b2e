// SPDX-License-Identifier: MIT
pragma solidity ^0.8.28;

/// @title GasMeter
/// @notice Never deployed. disburser's simulation places this code at the payer's own
/// address for one `eth_call` (a state override) and calls it with
/// `abi.encode(target, data)`: it runs `target.call(data)` with the payer as msg.sender,
/// exactly as the payer's transaction would, and answers `abi.encode(ok, gasUsed, returned)`.
/// One execution and a short answer, where eth_estimateGas runs the call a dozen times and
/// eth_simulateV1 answers with every log of the batch.
contract GasMeter {
    fallback(bytes calldata input) external returns (bytes memory) {
        (address target, bytes memory data) = abi.decode(input, (address, bytes));
        uint256 before = gasleft();
        (bool ok, bytes memory returned) = target.call(data);
        uint256 used = before - gasleft();
        return abi.encode(ok, used, returned);
    }
}
