"""Generated from proto/ by `make proto` (betterproto2). Do not edit."""
