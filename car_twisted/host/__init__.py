"""Host state: the agents, devices and approvals hosts see, the approval gate, the chat relay and chat goals."""
