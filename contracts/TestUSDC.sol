// SPDX-License-Identifier: MIT
pragma solidity ^0.8.20;

/// @title TestUSDC
/// @notice A small USDC-like token for local chains and tests. It behaves like Circle's
/// FiatToken where disburser can tell the difference: 6 decimals (set by `initialize`),
/// a blacklist checked on the caller, the sender and the receiver, a pause switch, the same
/// revert strings and the same events.
/// @dev It has no constructor arguments and keeps all its state in ordinary storage, so its
/// runtime code can be placed at the canonical USDC address with `anvil_setCode` (storage
/// starts empty) and then set up once with `initialize`. The owner is also the master
/// minter, the pauser and the blacklister. Unlike FiatToken v2.2, the blacklist lives in its
/// own mapping (not in the balance slot), so a transfer costs one more cold storage read.
contract TestUSDC {
    string public name;
    string public symbol;
    uint8 public decimals;
    uint256 public totalSupply;
    address public owner;
    bool public paused;
    bool public initialized;

    mapping(address => uint256) public balanceOf;
    mapping(address => mapping(address => uint256)) public allowance;
    mapping(address => bool) internal _blacklisted;
    mapping(address => bool) public isMinter;
    mapping(address => uint256) public minterAllowance;

    event Transfer(address indexed from, address indexed to, uint256 value);
    event Approval(address indexed owner, address indexed spender, uint256 value);
    event Mint(address indexed minter, address indexed to, uint256 amount);
    event MinterConfigured(address indexed minter, uint256 minterAllowedAmount);
    event Blacklisted(address indexed _account);
    event UnBlacklisted(address indexed _account);
    event Pause();
    event Unpause();
    event OwnershipTransferred(address previousOwner, address newOwner);

    modifier onlyOwner() {
        require(msg.sender == owner, "Ownable: caller is not the owner");
        _;
    }

    // The owner holds every role; each role check keeps FiatToken's own revert string.
    modifier onlyRole(string memory message) {
        require(msg.sender == owner, message);
        _;
    }

    modifier whenNotPaused() {
        require(!paused, "Pausable: paused");
        _;
    }

    modifier notBlacklisted(address account) {
        require(!_blacklisted[account], "Blacklistable: account is blacklisted");
        _;
    }

    /// @notice One-time setup; anyone may call it, but only once.
    function initialize(
        string calldata tokenName,
        string calldata tokenSymbol,
        uint8 tokenDecimals,
        address newOwner
    ) external {
        require(!initialized, "FiatToken: contract is already initialized");
        require(newOwner != address(0), "FiatToken: new owner is the zero address");
        name = tokenName;
        symbol = tokenSymbol;
        decimals = tokenDecimals;
        owner = newOwner;
        initialized = true;
        emit OwnershipTransferred(address(0), newOwner);
    }

    // --- roles: the owner holds all of them ---

    function masterMinter() external view returns (address) {
        return owner;
    }

    function pauser() external view returns (address) {
        return owner;
    }

    function blacklister() external view returns (address) {
        return owner;
    }

    function transferOwnership(address newOwner) external onlyOwner {
        require(newOwner != address(0), "Ownable: new owner is the zero address");
        emit OwnershipTransferred(owner, newOwner);
        owner = newOwner;
    }

    // --- ERC-20 ---

    function approve(address spender, uint256 value)
        external
        whenNotPaused
        notBlacklisted(msg.sender)
        notBlacklisted(spender)
        returns (bool)
    {
        require(spender != address(0), "ERC20: approve to the zero address");
        allowance[msg.sender][spender] = value;
        emit Approval(msg.sender, spender, value);
        return true;
    }

    function transfer(address to, uint256 value)
        external
        whenNotPaused
        notBlacklisted(msg.sender)
        notBlacklisted(to)
        returns (bool)
    {
        _transfer(msg.sender, to, value);
        return true;
    }

    function transferFrom(address from, address to, uint256 value)
        external
        whenNotPaused
        notBlacklisted(msg.sender)
        notBlacklisted(from)
        notBlacklisted(to)
        returns (bool)
    {
        uint256 allowed = allowance[from][msg.sender];
        require(value <= allowed, "ERC20: transfer amount exceeds allowance");
        unchecked {
            allowance[from][msg.sender] = allowed - value;
        }
        _transfer(from, to, value);
        return true;
    }

    function _transfer(address from, address to, uint256 value) internal {
        require(to != address(0), "ERC20: transfer to the zero address");
        uint256 fromBalance = balanceOf[from];
        require(value <= fromBalance, "ERC20: transfer amount exceeds balance");
        unchecked {
            // Cannot overflow: the sum of all balances is totalSupply, which mint checks.
            balanceOf[from] = fromBalance - value;
            balanceOf[to] += value;
        }
        emit Transfer(from, to, value);
    }

    // --- minting ---

    /// @notice The owner (master minter) lets `minter` mint up to `minterAllowedAmount` more.
    /// An allowance of zero keeps the minter but lets it mint nothing.
    function configureMinter(address minter, uint256 minterAllowedAmount)
        external
        whenNotPaused
        onlyRole("FiatToken: caller is not the masterMinter")
        returns (bool)
    {
        isMinter[minter] = true;
        minterAllowance[minter] = minterAllowedAmount;
        emit MinterConfigured(minter, minterAllowedAmount);
        return true;
    }

    /// @notice Mint `amount` to `to`. The owner mints without limit; a configured minter
    /// within its allowance.
    function mint(address to, uint256 amount)
        external
        whenNotPaused
        notBlacklisted(msg.sender)
        notBlacklisted(to)
        returns (bool)
    {
        require(to != address(0), "FiatToken: mint to the zero address");
        require(amount > 0, "FiatToken: mint amount not greater than 0");
        if (msg.sender != owner) {
            require(isMinter[msg.sender], "FiatToken: caller is not a minter");
            uint256 left = minterAllowance[msg.sender];
            require(amount <= left, "FiatToken: mint amount exceeds minterAllowance");
            unchecked {
                minterAllowance[msg.sender] = left - amount;
            }
        }
        totalSupply += amount; // checked: bounds every balance below
        unchecked {
            balanceOf[to] += amount;
        }
        emit Mint(msg.sender, to, amount);
        emit Transfer(address(0), to, amount);
        return true;
    }

    // --- blacklist ---

    function isBlacklisted(address account) external view returns (bool) {
        return _blacklisted[account];
    }

    function blacklist(address account) external onlyRole("Blacklistable: caller is not the blacklister") {
        _blacklisted[account] = true;
        emit Blacklisted(account);
    }

    function unBlacklist(address account) external onlyRole("Blacklistable: caller is not the blacklister") {
        _blacklisted[account] = false;
        emit UnBlacklisted(account);
    }

    // --- pause ---

    function pause() external onlyRole("Pausable: caller is not the pauser") {
        paused = true;
        emit Pause();
    }

    function unpause() external onlyRole("Pausable: caller is not the pauser") {
        paused = false;
        emit Unpause();
    }
}
