"""Preference training (`lorakit rlhf`): losses, preference data, the reference policy, the command."""
